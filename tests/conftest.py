"""Fixtures that start real servers: redis-server and the Kafka-protocol broker.

The broker is ROOMCAST_TEST_BROKER's: tansu (default; starts in tens of
milliseconds) or kafka (Apache Kafka, about 5 s; without a JDK or Maven its
tests skip naming what to install, or fail under ROOMCAST_REQUIRE_KAFKA=1).
Each test gets its own servers on free loopback ports: no state leaks between
tests.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from roomcast.devstack import start_broker
from roomcast.embedded import ManagedProcess, MissingBinary, start_redis
from tests.support import REQUIRE_KAFKA, TEST_BROKER

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


def start_test_broker(log_path: Path) -> ManagedProcess:
    """The test broker (TEST_BROKER); a missing JDK or Maven skips, or fails in CI."""
    try:
        return start_broker(TEST_BROKER, log_path=log_path)
    except MissingBinary as exc:
        if REQUIRE_KAFKA:
            pytest.fail(f"ROOMCAST_REQUIRE_KAFKA=1 but {exc}", pytrace=False)
        pytest.skip(f"ROOMCAST_TEST_BROKER={TEST_BROKER} needs what is missing: {exc}")


@pytest.fixture
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedProcess]:
    """A fresh broker on a free port (no topics yet)."""
    broker = start_test_broker(tmp_path_factory.mktemp("broker") / "kafka.log")
    yield broker
    broker.stop()


@pytest.fixture
def kafka_bootstrap(kafka_broker: ManagedProcess) -> str:
    return kafka_broker.address
