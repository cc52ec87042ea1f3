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

from roomcast.kafka import consumer_lag, contiguous
from roomcast.membership import ConsumerStalled, MemberFile, WatchedMember
from roomcast.offsets import OffsetGapGuard
from roomcast.watchdog import ConsumerWatchdog, stall_bound_s
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

# A revocation waits this long for the in-flight batch; past it the group goes
# on and the batch's commit fails (its records are relayed again, and dropped
# by seq at every gateway).
REVOKE_GRACE_S = 2.0
# Each PUBLISH pipeline and each commit is bounded, so a batch can never hold
# the member back from a rebalance for long.
BATCH_STEP_TIMEOUT_S = 5.0


class _Membership(ConsumerRebalanceListener):
    """Tracks the member's assignment; a revocation waits (bounded) for the in-flight batch."""

    def __init__(self, relay: CreatedRelay, consumer: AIOKafkaConsumer) -> None:
        self.relay = relay
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        relay = self.relay
        relay.in_group = False
        try:
            await asyncio.wait_for(relay._batch_lock.acquire(), REVOKE_GRACE_S)
        except asyncio.TimeoutError:
            log.warning(
                "a batch held up the revocation of %s for %.0f s; going on without it",
                sorted(tp.partition for tp in revoked), REVOKE_GRACE_S,
            )
        else:
            relay._batch_lock.release()
        relay.offsets.forget(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        relay = self.relay
        relay.offsets.forget(assigned)  # they start from their committed offsets
        relay.in_group = True
        relay.member_file.track(self.consumer)
        log.info("message.created partitions assigned: %s", sorted(tp.partition for tp in assigned))


class CreatedRelay:
    """Reads message.created in group realtime-gateway-group and PUBLISHes each event.

    One ordered pipeline: a batch's records are published in partition order,
    then its offsets are committed; a failed publish rewinds the partitions and
    retries, so nothing is skipped. Redeliveries are dropped by seq at every
    gateway.

    Liveness: a watchdog (roomcast.watchdog) rejoins with a fresh consumer
    when the member is out of a settled group, or stuck with records waiting,
    for longer than a bound derived from the group timeouts; after two such
    rejoins `run` ends with ConsumerStalled and `on_stalled` is called (the
    worker exits non-zero so its supervisor starts a fresh one).
    """

    def __init__(
        self,
        bootstrap: str,
        publish: Publish,
        *,
        fetch_max_wait_ms: int,
        client_id: str,
        group_id: str = GATEWAY_GROUP,
        session_timeout_ms: int = 6000,
        static_member_id: str | None = None,
        max_records: int = 1000,
        on_stalled: Callable[[ConsumerStalled], None] | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        self.publish = publish
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.client_id = client_id
        self.group_id = group_id
        self.session_timeout_ms = session_timeout_ms
        # A relay's batch takes milliseconds and its revocation waits at most
        # REVOKE_GRACE_S: a member not back within a session is gone.
        self.rebalance_timeout_ms = session_timeout_ms
        self.static_member_id = static_member_id
        self.max_records = max_records
        self.on_stalled = on_stalled
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._batch_lock = asyncio.Lock()
        self.published = 0
        self.fetched = 0  # records handed out by the consumer: the watchdog's progress
        self.attempts = 0  # failed connection attempts: progress too, while the broker is away
        self.connected = False
        self.in_group = False
        self._next_offset: dict[TopicPartition, int] = {}
        # Holds back records past a hole in a partition's offsets (the embedded
        # broker can show a later record before an earlier one: roomcast.offsets).
        self.offsets = OffsetGapGuard()
        self.member_file = MemberFile(bootstrap, group_id, client_id)
        self.member = WatchedMember(
            "the message.created relay",
            ConsumerWatchdog(
                stall_bound_s(session_timeout_ms, self.rebalance_timeout_ms), orphan_after_s=session_timeout_ms / 1000
            ),
            connect=self._open,
            consume=self._consume,
            close=self._close,
            state=self._member_state,
            stop=self._stop,
            topic=CREATED_TOPIC,
        )

    def _member_state(self) -> tuple[bool, int, int]:
        if self._consumer is not None:
            self.member_file.track(self._consumer)
        return self.in_group, self.lag(), self.fetched + self.attempts

    @property
    def live(self) -> bool:
        """Connected and not stuck for longer than a session (feeds readiness)."""
        return self.connected and self.member.stalled_for() * 1000 < self.session_timeout_ms

    async def start(self) -> None:
        if self._task is None and self.bootstrap:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="created-relay")

    async def _run(self) -> None:
        try:
            await self.member.run()
        except ConsumerStalled as exc:
            log.error("%s; giving up", exc)
            if self.on_stalled is not None:
                self.on_stalled(exc)

    async def _open(self) -> AIOKafkaConsumer | None:
        # A previous incarnation of this worker killed -9 would otherwise hold
        # its partitions until its session expires. A static member needs no
        # fence: the broker gives its partitions back to its successor.
        if self.static_member_id is None:
            await self.member_file.fence_previous()
        delay = 0.1
        while not self._stop.is_set():
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.bootstrap,
                group_id=self.group_id,
                client_id=self.client_id,
                group_instance_id=self.static_member_id,
                enable_auto_commit=False,
                # Start from earliest + committed offsets: latest is wrong on the
                # embedded broker, and the gateways' seq check drops replays.
                auto_offset_reset="earliest",
                fetch_max_wait_ms=self.fetch_max_wait_ms,
                session_timeout_ms=self.session_timeout_ms,
                heartbeat_interval_ms=max(300, self.session_timeout_ms // 6),
                rebalance_timeout_ms=self.rebalance_timeout_ms,
                max_poll_interval_ms=max(60_000, self.rebalance_timeout_ms),
            )
            consumer.subscribe([CREATED_TOPIC], listener=_Membership(self, consumer))
            try:
                await self.member_file.start(consumer)
            except Exception as exc:
                await consumer.stop()
                self.attempts += 1
                log.warning("kafka %s unreachable for the relay (%s); retrying", self.bootstrap, exc)
                delay = await _backoff(delay)
                continue
            except BaseException:  # cancelled: the watchdog gave up on this join
                await asyncio.wait_for(consumer.stop(), BATCH_STEP_TIMEOUT_S)
                raise
            self._consumer = consumer
            self.connected = True
            return consumer
        return None

    async def _close(self, consumer: AIOKafkaConsumer) -> None:
        """Leave the group (bounded: a stuck member must not hold its successor back)."""
        self.in_group = False
        self.connected = False
        self._consumer = None
        self._next_offset.clear()
        self.offsets.forget(list(consumer.assignment()))
        try:
            await asyncio.wait_for(consumer.stop(), BATCH_STEP_TIMEOUT_S)
            self.member_file.forget()
        except Exception as exc:
            log.warning("closing the relay consumer failed (%r); its session will expire", exc)

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        delay = 0.1
        while not self._stop.is_set():
            try:
                batches = await consumer.getmany(timeout_ms=200, max_records=self.max_records)
            except KafkaError as exc:
                log.warning("fetching message.created failed (%s); retrying", exc)
                delay = await _backoff(delay)
                continue
            if not batches:
                continue
            self.fetched += sum(len(rs) for rs in batches.values())
            async with self._batch_lock:
                batches = await contiguous(consumer, self.offsets, batches)
                if not batches:
                    continue
                try:
                    await self._relay(consumer, batches)
                    delay = 0.1
                    continue
                except Exception as exc:
                    log.warning("relaying message.created failed (%r); rewinding and retrying", exc)
                    for tp, records in batches.items():
                        if tp in consumer.assignment():
                            consumer.seek(tp, records[0].offset)
                            self.offsets.expect(tp, records[0].offset)
            delay = await _backoff(delay)  # outside the lock: a revocation need not wait for it

    async def _relay(self, consumer: AIOKafkaConsumer, batches: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        # One PUBLISH pipeline and one commit for the whole fetch: each
        # partition's records stay in order inside the pipeline, and a commit
        # per partition would cost a broker round trip each.
        records = [(r.key or b"", r.value or b"") for rs in batches.values() for r in rs]
        await asyncio.wait_for(self.publish(records), BATCH_STEP_TIMEOUT_S)
        self.published += len(records)
        offsets = {tp: rs[-1].offset + 1 for tp, rs in batches.items()}
        await asyncio.wait_for(consumer.commit(offsets), BATCH_STEP_TIMEOUT_S)
        self._next_offset.update(offsets)

    def lag(self) -> int:
        """Records of message.created on this worker's partitions not yet handed to the relay."""
        consumer = self._consumer
        return 0 if consumer is None else consumer_lag(consumer, self._next_offset)

    async def aclose(self) -> None:
        """Finish the in-flight batch, commit, leave the group. Idempotent."""
        self._stop.set()
        if self._task is not None:
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                log.exception("the relay ended with an error")
            self._task = None
