"""The gateway's Kafka side: the ingest producer and the message.created relay.

Both start in the background and keep retrying while the broker is
unreachable: the gateway still serves joins and Redis fan-out, and answers
posts with `unavailable` (never an ack for something not stored).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from roomcast.kafka import contiguous
from roomcast.offsets import OffsetGapGuard
from roomcast.wire.events import CREATED_TOPIC, GATEWAY_GROUP, INGEST_TOPIC

__all__ = ["IngestProducer", "CreatedRelay"]

log = logging.getLogger("roomcast.gateway.kafka")


async def _backoff(delay: float, max_s: float = 5.0) -> float:
    await asyncio.sleep(delay * (0.5 + random.random()))
    return min(delay * 2, max_s)


class IngestProducer:
    """Produces posts to message.ingest (key = room, acks=all, small linger)."""

    def __init__(self, bootstrap: str, *, linger_ms: int, timeout_ms: int, client_id: str) -> None:
        self.bootstrap = bootstrap
        self.linger_ms = linger_ms
        self.timeout_s = timeout_ms / 1000
        self.client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def ready(self) -> bool:
        return self._producer is not None

    async def start(self) -> None:
        """Begin connecting in the background. Idempotent."""
        if self._task is None and self.bootstrap:
            self._task = asyncio.get_running_loop().create_task(self._connect(), name="ingest-producer")

    async def _connect(self) -> None:
        delay = 0.1
        while not self._closing:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                client_id=self.client_id,
                acks="all",
                linger_ms=self.linger_ms,
                enable_idempotence=False,  # the embedded broker has no InitProducerId
                request_timeout_ms=max(1000, int(self.timeout_s * 1000)),
                retry_backoff_ms=50,
            )
            try:
                await producer.start()
            except Exception as exc:
                await producer.stop()
                log.warning("kafka %s unreachable for the producer (%s); retrying", self.bootstrap, exc)
                delay = await _backoff(delay)
                continue
            self._producer = producer
            log.info("ingest producer connected to %s", self.bootstrap)
            return

    async def post(self, key: bytes, value: bytes) -> bool:
        """Produce one record and wait for the broker's ack. False: not accepted now."""
        producer = self._producer
        if producer is None:
            return False
        try:
            await asyncio.wait_for(producer.send_and_wait(INGEST_TOPIC, value=value, key=key), self.timeout_s)
            return True
        except (KafkaError, asyncio.TimeoutError, OSError) as exc:
            log.warning("post not accepted by kafka: %r", exc)
            return False

    async def aclose(self) -> None:
        """Flush what is queued and close. Idempotent."""
        self._closing = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await asyncio.wait_for(producer.stop(), self.timeout_s)
            except Exception:
                log.exception("closing the ingest producer failed")


Publish = Callable[[list[tuple[bytes, bytes]]], Awaitable[None]]


class _WaitForBatch(ConsumerRebalanceListener):
    """On revocation, wait for the in-flight batch to be published and committed."""

    def __init__(self, lock: asyncio.Lock, offsets: OffsetGapGuard) -> None:
        self.lock = lock
        self.offsets = offsets

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        async with self.lock:
            self.offsets.forget(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.offsets.forget(assigned)  # they start from their committed offsets
        log.info("message.created partitions assigned: %s", sorted(tp.partition for tp in assigned))


class CreatedRelay:
    """Reads message.created in group realtime-gateway-group and PUBLISHes each event.

    One ordered pipeline: a batch's records are published in partition order,
    then its offsets are committed; a failed publish rewinds the partitions and
    retries, so nothing is skipped (PITFALLS.md 3, 4). Redeliveries are dropped
    by seq at every gateway.
    """

    def __init__(
        self,
        bootstrap: str,
        publish: Publish,
        *,
        fetch_max_wait_ms: int,
        client_id: str,
        group_id: str = GATEWAY_GROUP,
        session_timeout_ms: int = 10_000,
        max_records: int = 1000,
    ) -> None:
        self.bootstrap = bootstrap
        self.publish = publish
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.client_id = client_id
        self.group_id = group_id
        self.session_timeout_ms = session_timeout_ms
        self.max_records = max_records
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._batch_lock = asyncio.Lock()
        self.published = 0
        self.connected = False
        self._next_offset: dict[TopicPartition, int] = {}
        # Holds back records past a hole in a partition's offsets (the embedded
        # broker can show a later record before an earlier one: roomcast.offsets).
        self.offsets = OffsetGapGuard()

    async def start(self) -> None:
        if self._task is None and self.bootstrap:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="created-relay")

    async def _open(self) -> AIOKafkaConsumer:
        delay = 0.1
        while True:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                group_id=self.group_id,
                client_id=self.client_id,
                enable_auto_commit=False,
                # Start from earliest + committed offsets: latest is wrong on the
                # embedded broker, and the gateways' seq check drops replays.
                auto_offset_reset="earliest",
                fetch_max_wait_ms=self.fetch_max_wait_ms,
                session_timeout_ms=self.session_timeout_ms,
                heartbeat_interval_ms=max(500, self.session_timeout_ms // 5),
                max_poll_interval_ms=60_000,
            )
            consumer.subscribe([CREATED_TOPIC], listener=_WaitForBatch(self._batch_lock, self.offsets))
            try:
                await consumer.start()
                return consumer
            except Exception as exc:
                await consumer.stop()
                log.warning("kafka %s unreachable for the relay (%s); retrying", self.bootstrap, exc)
                delay = await _backoff(delay)

    async def _run(self) -> None:
        consumer = self._consumer = await self._open()
        self.connected = True
        delay = 0.1
        while not self._stopping:
            try:
                batches = await consumer.getmany(timeout_ms=200, max_records=self.max_records)
            except KafkaError as exc:
                log.warning("fetching message.created failed (%s); retrying", exc)
                delay = await _backoff(delay)
                continue
            if not batches:
                continue
            async with self._batch_lock:
                batches = await contiguous(consumer, self.offsets, batches)
                if not batches:
                    continue
                try:
                    await self._relay(consumer, batches)
                    delay = 0.1
                except Exception as exc:
                    log.warning("relaying message.created failed (%s); rewinding and retrying", exc)
                    for tp, records in batches.items():
                        if tp in consumer.assignment():
                            consumer.seek(tp, records[0].offset)
                            self.offsets.expect(tp, records[0].offset)
                    delay = await _backoff(delay)

    async def _relay(self, consumer: AIOKafkaConsumer, batches: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        # One PUBLISH pipeline and one commit for the whole fetch: each
        # partition's records stay in order inside the pipeline, and a commit
        # per partition would cost a broker round trip each.
        records = [(r.key or b"", r.value or b"") for rs in batches.values() for r in rs]
        await self.publish(records)
        self.published += len(records)
        offsets = {tp: rs[-1].offset + 1 for tp, rs in batches.items()}
        await consumer.commit(offsets)
        self._next_offset.update(offsets)

    def lag(self) -> int:
        """Records of message.created on this worker's partitions not yet published.

        From highwater() (ListOffsets(latest) is wrong on the embedded broker).
        """
        consumer = self._consumer
        if consumer is None:
            return 0
        total = 0
        for tp in consumer.assignment():
            high = consumer.highwater(tp)
            if high is not None:
                total += max(0, high - self._next_offset.get(tp, 0))
        return total

    async def aclose(self) -> None:
        """Stop after the in-flight batch, commit, leave the group. Idempotent."""
        self._stopping = True
        if self._task is not None:
            if not self._task.done():
                async with self._batch_lock:
                    self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                await asyncio.wait_for(consumer.stop(), 10)  # leaves the group
            except Exception:
                log.exception("closing the relay consumer failed")
        self.connected = False
