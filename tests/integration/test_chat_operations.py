"""The chat service as operators see it: /metrics, /readyz, retention through the HTTP API, Postgres end to end.

Real Tansu broker, real stores (SQLite file or a database on the session's
throwaway Postgres cluster), real sockets. Tests parametrized over `backend`
run the whole service on each store, chosen by `database_url` as
`roomcast chat --database-url ...` would. Each pays one consumer-group start
on Tansu.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from chat.app import ChatService, retention_of, run_chat
from chat.storage import Retention, StoredMessage, open_store
from chat.storage.sqlite import SqliteStore
from roomcast.embedded import ManagedProcess, free_port, start_tansu
from roomcast.kafka import ensure_topics
from tests.integration.chat_harness import (
    FLOW_TIMEOUT_S,
    READY_TIMEOUT_S,
    RunningChat,
    chat_config,
    http_get,
    post,
    record,
    wait_until,
)
from tests.integration.conftest import CHAT_TEST_PARTITIONS
from tests.support import TIMEOUT_FACTOR
from roomcast.wire.events import INGEST_TOPIC, IngestRecord, encode_ingest

PARTITIONS = CHAT_TEST_PARTITIONS  # the topics the `bootstrap` fixture creates
T0 = 1_732_650_000_000


# ---- helpers -------------------------------------------------------------------


def parse_metrics(text: bytes) -> dict[str, float]:
    """Prometheus text format -> {sample name with labels: value}."""
    out = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def scrape(port: int) -> dict[str, float]:
    status, headers, body = await http_get(port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_metrics(body)


class GatedSqliteStore(SqliteStore):
    """The real SQLite store, whose store_batch waits at a gate (a stalled database)."""

    def __init__(self, path: Path, **kwargs: object) -> None:
        super().__init__(path, **kwargs)  # type: ignore[arg-type]
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def store_batch(self, records: Sequence[IngestRecord], now_ms: int) -> list[StoredMessage]:
        self.entered.set()
        await self.gate.wait()
        return await super().store_batch(records, now_ms)


# ---- fixtures ------------------------------------------------------------------------


@pytest.fixture(params=("sqlite", "postgres"))
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    return f"sqlite:///{tmp_path / 'chat.db'}"


# ---- metrics, and the store chosen by database_url -------------------------------------


async def test_metrics_move_with_traffic_and_history_keeps_the_retention_count(
    bootstrap: str, database_url: str, producer: AIOKafkaProducer
) -> None:
    # run_chat: the store comes from config.database_url, the retention from the config.
    config = chat_config(bootstrap, database_url, retention_count=5, retention_age_s=0)
    stop = asyncio.Event()
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run_chat(config, on_ready=ready.set_result, stop=stop))
    try:
        port = await asyncio.wait_for(asyncio.shield(ready), READY_TIMEOUT_S)
        before = await scrape(port)
        for name in (
            "roomcast_chat_messages_stored_total", "roomcast_chat_duplicates_total", "roomcast_chat_malformed_total",
            "roomcast_chat_seq_conflicts_total", "roomcast_chat_pruned_total", "roomcast_chat_consumer_lag_messages",
            "roomcast_chat_store_latency_seconds_count", "roomcast_chat_produce_latency_seconds_count",
            "roomcast_chat_batch_records_count",
        ):
            assert before[name] == 0, name
        assert before["roomcast_chat_ready"] == 1

        for i in range(8):
            await post(producer, record("r1", f"c-{i}"))
        await post(producer, record("r1", "c-7"))  # a repeat
        await producer.send_and_wait(INGEST_TOPIC, b"not json", key=b"r1")
        await producer.send_and_wait(INGEST_TOPIC, encode_ingest(record("bad room!", "x")), key=b"r1")

        async def settled() -> bool:
            m = await scrape(port)
            return m["roomcast_chat_messages_stored_total"] == 8 and m["roomcast_chat_duplicates_total"] == 1 and (
                m["roomcast_chat_malformed_total"] == 2
            )

        await wait_until(settled, "the counters to count the traffic")
        m = await scrape(port)
        assert m["roomcast_chat_pruned_total"] == 3  # 8 stored, 5 kept
        assert m["roomcast_chat_seq_conflicts_total"] == 0
        assert m["roomcast_chat_batch_records_sum"] == 11
        batches = m["roomcast_chat_batch_records_count"]
        assert batches >= 1 and m['roomcast_chat_batch_records_bucket{le="+Inf"}'] == batches
        assert 1 <= m["roomcast_chat_store_latency_seconds_count"] <= batches
        assert m["roomcast_chat_store_latency_seconds_sum"] > 0
        assert 1 <= m["roomcast_chat_produce_latency_seconds_count"] <= batches
        assert m["roomcast_chat_consumer_lag_messages"] == 0

        # History shows the count kept, and where it starts.
        status, headers, body = await http_get(port, "/rooms/r1/messages?after=0")
        page = json.loads(body)
        assert status == 200 and page["latest_seq"] == 8
        assert [e["seq"] for e in page["messages"]] == [4, 5, 6, 7, 8]
        assert headers["x-roomcast-oldest-seq"] == "4"
    finally:
        stop.set()
        await asyncio.wait_for(task, 20 * TIMEOUT_FACTOR)


async def test_consumer_lag_grows_while_the_store_stalls_and_returns_to_0(
    bootstrap: str, tmp_path: Path, producer: AIOKafkaProducer, services: list[RunningChat]
) -> None:
    config = chat_config(bootstrap, "unused")
    store = GatedSqliteStore(tmp_path / "chat.db")
    running = RunningChat(ChatService(config, store))
    services.append(running)
    port = await running.wait_ready()
    await post(producer, record("r1", "first"))
    await asyncio.wait_for(store.entered.wait(), FLOW_TIMEOUT_S)  # the first batch holds one record
    # Nine more in one produce batch: a fetch sees all or none of them. (Sent
    # one by one, a fetch could take the first few, and aiokafka fetches no
    # more of a partition while records of it are buffered, so highwater()
    # would stay behind.)
    batcher = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=200)
    await batcher.start()
    try:
        sent = [await batcher.send(INGEST_TOPIC, encode_ingest(record("r1", f"c-{i}")), key=b"r1") for i in range(9)]
        await batcher.flush()
        assert len({(await f).offset for f in sent}) == 9
    finally:
        await batcher.stop()
    await wait_until(
        lambda: _metric_is(port, "roomcast_chat_consumer_lag_messages", 9), "lag 9 while the store is stalled"
    )
    store.gate.set()
    await wait_until(lambda: _metric_is(port, "roomcast_chat_messages_stored_total", 10), "all 10 stored")
    await wait_until(lambda: _metric_is(port, "roomcast_chat_consumer_lag_messages", 0), "lag back to 0")
    await running.stop()


async def _metric_is(port: int, name: str, value: float) -> bool:
    return (await scrape(port))[name] == value


# ---- readiness ----------------------------------------------------------------------------


async def test_readyz_is_503_until_the_kafka_consumer_starts_then_200(tmp_path: Path, services: list[RunningChat]) -> None:
    kafka_port = free_port()
    config = chat_config(f"127.0.0.1:{kafka_port}", f"sqlite:///{tmp_path / 'chat.db'}")
    running = RunningChat(ChatService(config, open_store(config.database_url)))
    services.append(running)
    port = await running.wait_listening()
    # History is served while Kafka is away, but the instance is not ready.
    assert (await http_get(port, "/readyz"))[0] == 503
    assert (await http_get(port, "/healthz"))[0] == 200
    assert (await http_get(port, "/rooms/r1/messages"))[0] == 200
    assert (await scrape(port))["roomcast_chat_ready"] == 0
    broker: ManagedProcess = start_tansu(port=kafka_port, log_path=tmp_path / "tansu.log")
    try:
        await ensure_topics(broker.address, PARTITIONS)
        assert await running.wait_ready() == port
        status, _, body = await http_get(port, "/readyz")
        assert (status, body) == (200, b"ready\n")
        await running.stop()
    finally:
        broker.stop()


async def test_readyz_turns_503_as_soon_as_a_stop_begins(
    bootstrap: str, tmp_path: Path, producer: AIOKafkaProducer, services: list[RunningChat]
) -> None:
    store = GatedSqliteStore(tmp_path / "chat.db")
    running = RunningChat(ChatService(chat_config(bootstrap, "unused"), store))
    services.append(running)
    port = await running.wait_ready()
    assert (await http_get(port, "/readyz"))[0] == 200
    # A batch in flight keeps the drain at its first step, with HTTP still up.
    await post(producer, record("r1", "c-1"))
    await asyncio.wait_for(store.entered.wait(), FLOW_TIMEOUT_S)
    running.stop_event.set()
    status, _, body = await http_get(port, "/readyz")
    assert (status, body) == (503, b"not ready\n")
    assert (await http_get(port, "/healthz"))[0] == 200
    assert (await scrape(port))["roomcast_chat_ready"] == 0
    store.gate.set()
    await asyncio.wait_for(running.task, 20 * TIMEOUT_FACTOR)
    assert running.service.statistics().stored == 1  # the batch finished inside the drain


# ---- retention through the HTTP API --------------------------------------------------------


async def test_retention_age_sweep_moves_history_oldest_seq_over_http(
    bootstrap: str, database_url: str, producer: AIOKafkaProducer, services: list[RunningChat]
) -> None:
    now = [T0]
    config = chat_config(bootstrap, database_url, retention_count=0, retention_age_s=60)
    assert retention_of(config) == Retention(keep_ms=60_000)
    store = open_store(config.database_url, retention=retention_of(config))
    running = RunningChat(ChatService(config, store, clock_ms=lambda: now[0], retention_sweep_s=0.05))
    services.append(running)
    port = await running.wait_ready()
    for i in range(3):
        await post(producer, record("r1", f"old-{i}"))
    await wait_until(lambda: running.service.statistics().stored == 3, "3 stored")
    now[0] += 30_000
    for i in range(2):
        await post(producer, record("r1", f"new-{i}"))
    await wait_until(lambda: running.service.statistics().stored == 5, "5 stored")
    status, headers, body = await http_get(port, "/rooms/r1/messages?after=0")
    assert [e["seq"] for e in json.loads(body)["messages"]] == [1, 2, 3, 4, 5]
    assert headers["x-roomcast-oldest-seq"] == "1"

    now[0] = T0 + 60_001  # the first three are now over 60 s old
    await wait_until(lambda: store.statistics().pruned == 3, "the sweep to drop 3")
    status, headers, body = await http_get(port, "/rooms/r1/messages?after=0")
    page = json.loads(body)
    assert status == 200 and page["latest_seq"] == 5
    assert [e["client_msg_id"] for e in page["messages"]] == ["new-0", "new-1"]
    assert headers["x-roomcast-oldest-seq"] == "4"
    # A reader at seq 2 (a `since`) sees the gap: the first message is above
    # after + 1, which the gateway answers with recovered:false.
    _, headers, body = await http_get(port, "/rooms/r1/messages?after=2")
    assert json.loads(body)["messages"][0]["seq"] == 4 and int(headers["x-roomcast-oldest-seq"]) > 3
    assert (await scrape(port))["roomcast_chat_pruned_total"] == 3
    # A new message keeps counting from the latest seq.
    await post(producer, record("r1", "later"))
    await wait_until(lambda: running.service.statistics().stored == 6, "6 stored")
    _, _, body = await http_get(port, "/rooms/r1/messages?after=5")
    assert [e["seq"] for e in json.loads(body)["messages"]] == [6]
    await running.stop()
