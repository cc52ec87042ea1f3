"""The stack of processes the end-to-end tests run: Redis, the test broker, chat, gateways.

The launcher is roomcast/devstack.py (shared with `roomcast dev` and the
benchmarks); these are the names the tests, chaos.py and soak.py use. Unlike
`roomcast dev` (one port, SO_REUSEPORT), each gateway worker here gets its own
port, so a test knows which worker each client is on. The broker is
ROOMCAST_TEST_BROKER's (tests/support.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from roomcast import devstack
from roomcast.devstack import DRAIN_WINDOW_S, Stack, start_chat, start_gateway
from roomcast.embedded import MissingBinary
from tests.support import REQUIRE_KAFKA, TEST_BROKER

__all__ = ["DRAIN_WINDOW_S", "Stack", "start_chat", "start_gateway", "start_stack"]


def start_stack(data_dir: Path, *args: Any, **kwargs: Any) -> Stack:
    """devstack.start_stack on the test broker; a missing JDK or Maven skips (fails in CI)."""
    kwargs.setdefault("broker", TEST_BROKER)
    try:
        return devstack.start_stack(data_dir, *args, **kwargs)
    except MissingBinary as exc:
        if REQUIRE_KAFKA:
            pytest.fail(f"ROOMCAST_REQUIRE_KAFKA=1 but {exc}", pytrace=False)
        pytest.skip(f"the {kwargs['broker']} broker needs what is missing: {exc}")
