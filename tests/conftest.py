"""Fixtures that start real servers: redis-server and the Tansu Kafka broker.

Both start in tens of milliseconds, so each test gets its own on free
loopback ports: no state leaks between tests. A missing binary fails with the
install step; it never silently skips.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from roomcast.embedded import ManagedProcess, start_redis, start_tansu

# Timeouts in tests scale with this factor on slow machines.
TIMEOUT_FACTOR = float(os.environ.get("ROOMCAST_TEST_TIMEOUT_FACTOR", "1"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", default=False, help="run the long fault-suite variants")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--long"):
        return
    skip_slow = pytest.mark.skip(reason="long variant: run with --long")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    """A fresh redis-server on a free port."""
    log = tmp_path_factory.mktemp("redis") / "redis.log"
    server = start_redis(log_path=log)
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: ManagedProcess) -> str:
    return f"redis://{redis_server.address}"


@pytest.fixture
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    """A fresh Tansu broker on a free port (memory storage; no topics yet)."""
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    broker = start_tansu(log_path=log)
    yield broker
    broker.stop()


@pytest.fixture
def kafka_bootstrap(kafka_broker: ManagedProcess) -> str:
    return kafka_broker.address
