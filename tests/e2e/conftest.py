"""The `dev_stack` fixture: the whole stack as `roomcast dev` runs it.

    def test_something(dev_stack: DevStack) -> None:
        ws = websocket.create_connection(dev_stack.ws + "?user=alice")
        ...

`dev_stack` is module-scoped: one stack (Redis, Tansu, the chat service, two
gateway workers on one port) per test module, so tests in a module share it
and must use their own room ids.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from roomcast.devstack import DevProcessFailed, start_dev_process
from roomcast.embedded import free_port
from tests.support import TEST_BROKER, TIMEOUT_FACTOR

__all__ = ["DevStack", "dev_stack", "READY_TIMEOUT_S", "STOP_TIMEOUT_S"]

# How long `roomcast dev` may take to print its ready line, and to stop after SIGTERM.
READY_TIMEOUT_S = 90.0 * TIMEOUT_FACTOR
STOP_TIMEOUT_S = 40.0

# Test switches that are no settings of the stack: `roomcast` refuses unknown
# ROOMCAST_* variables, so they are not passed to it.
_NOT_SETTINGS = ("ROOMCAST_REQUIRE_BROWSER",)


@dataclass(frozen=True)
class DevStack:
    """A running `roomcast dev`, as announced by its ready line.

    ws: the gateway's WebSocket URL (`ws://127.0.0.1:P/ws`); redis: a
    `redis://` URL; kafka: `host:port` bootstrap; history: the chat service's
    base URL (history API and page); page: the demo page's URL; proc: the
    `roomcast dev` process (its output goes to `dev-stack.log` in its data dir).
    """

    ws: str
    redis: str
    kafka: str
    history: str
    page: str
    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def dev_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    """`roomcast dev --port <free> --workers 2 --data-dir <tmp>`, running until the module ends.

    Fails with the stack's output if the ready line does not come within
    READY_TIMEOUT_S or the process exits first. Teardown sends SIGTERM and
    waits STOP_TIMEOUT_S before killing it.
    """
    env = {key: value for key, value in os.environ.items() if key not in _NOT_SETTINGS}
    try:
        dev = start_dev_process(
            tmp_path_factory.mktemp("dev-stack"), "--port", str(free_port()), "--workers", "2", "--broker", TEST_BROKER,
            timeout_s=READY_TIMEOUT_S, env=env,
        )
    except DevProcessFailed as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        f = dev.fields
        yield DevStack(f["ws"], f["redis"], f["kafka"], f["history"], f["page"], dev.proc)
    finally:
        dev.stop(STOP_TIMEOUT_S)
