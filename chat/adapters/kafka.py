"""The ingest pipeline: Kafka `message.ingest` -> store -> Kafka `message.created`.

One batch at a time, in one task, so a partition's records keep their order
from fetch to produce (PITFALLS 4):

1. `getmany` up to `batch_max` records (group `chat-service`, no auto-commit).
2. Decode and validate each; a malformed one is logged, counted and skipped.
3. `store.store_batch` the rest in one transaction: per-room seq, dedupe.
4. Produce every resulting event (new or re-emitted duplicate) to
   `message.created`, key = room, in record order, and wait for all acks.
5. Only then commit the batch's offsets (PROTOCOL.md 4, PITFALLS 3).

A crash between 3 and 5 is healed by re-consumption: the store's dedupe
returns the already-stored events, which are produced again (gateways drop a
seq they already delivered). A store or produce failure retries the whole
batch with backoff, never committing past it. When the group takes partitions
away mid-batch, the revocation waits a little for the batch to finish and
commit; otherwise the batch is abandoned uncommitted and its records go to
the new owner.

Metrics (`roomcast_chat_*`, registered in the registry passed in): batch
sizes, store and produce latency per batch, counts from `statistics()`, and
the consumer lag: `highwater()` minus the position, per assigned partition
(ListOffsets(latest) is wrong on the embedded broker).

Embedded-broker notes (README, "Limits"): never the idempotent producer
(Tansu has no InitProducerId), a small fetch wait because Tansu does not wake
waiting fetches, and Tansu's first group generation is 0, for which aiokafka
skips LeaveGroup on stop; `_leave_generation_zero` sends it so a restart
rejoins in ~3 s instead of waiting out the session timeout.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.protocol.group import LeaveGroupRequest
from aiokafka.structs import ConsumerRecord

from chat.core.validation import validate_ingest
from chat.storage.base import MessageStore, StoredMessage, StoreError
from roomcast.config import ChatConfig
from roomcast.kafka import consumer_lag, contiguous
from roomcast.membership import MemberFile, WatchedMember
from roomcast.metrics import SIZE_BUCKETS, MetricsRegistry
from roomcast.offsets import OffsetGapGuard
from roomcast.watchdog import ConsumerWatchdog, stall_bound_s
from roomcast.wire.events import CHAT_GROUP, CREATED_TOPIC, INGEST_TOPIC, IngestRecord, decode_ingest, encode_event

__all__ = ["IngestPipeline", "KafkaTuning", "PipelineStatistics", "wall_clock_ms"]

log = logging.getLogger("roomcast.chat.kafka")

Client = TypeVar("Client", AIOKafkaConsumer, AIOKafkaProducer)

# Failures worth retrying: the database or Kafka is away for a while.
_TRANSIENT = (StoreError, KafkaError, OSError, TimeoutError)


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class KafkaTuning:
    """Timings of the pipeline's Kafka clients and retries (not user settings yet).

    The session timeout is a setting (`kafka_session_timeout_ms`).
    """

    heartbeat_interval_ms: int = 1000
    # A batch takes milliseconds and its revocation waits revoke_grace_s: a
    # member not back within this is gone (and the watchdog's bound, derived
    # from it, stays short).
    rebalance_timeout_ms: int = 6000
    poll_timeout_ms: int = 100  # getmany wait when idle; bounds how fast a stop is seen
    request_timeout_ms: int = 10_000
    revoke_grace_s: float = 3.0  # how long a revocation waits for the in-flight batch
    shutdown_grace_s: float = 5.0  # how long a stop lets a failing batch keep retrying
    retry_initial_s: float = 0.05
    retry_max_s: float = 2.0
    connect_retry_max_s: float = 5.0


@dataclass(frozen=True)
class PipelineStatistics:
    """A snapshot of the pipeline's counters (feeds logs, /metrics later, and tests)."""

    batches: int
    records: int
    stored: int
    duplicates: int
    malformed: int
    produced: int
    commits: int
    commit_failures: int
    retries: int
    abandoned_batches: int
    last_batch_ms: float
    consumer_lag: int = 0


class IngestPipeline:
    """Consumes message.ingest, stores, produces message.created, commits.

    Call `await connect(stop)` once (retries until Kafka answers or `stop` is
    set), then `await run(stop)` until `stop` is set, then `await aclose()`.
    Its metrics go into `metrics` (a registry of its own when None).
    Raises ValueError when config.batch_max is below 1.
    """

    def __init__(
        self,
        config: ChatConfig,
        store: MessageStore,
        *,
        tuning: KafkaTuning = KafkaTuning(),
        clock_ms: Callable[[], int] = wall_clock_ms,
        metrics: MetricsRegistry | None = None,
    ) -> None:
        if config.batch_max < 1:
            raise ValueError(f"batch_max must be 1 or more, not {config.batch_max}")
        self.config = config
        self.store = store
        self.tuning = tuning
        self._clock_ms = clock_ms
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        # Bumped at every revocation: a batch from an older epoch must not
        # produce or commit any more (its partitions may be someone else's).
        self._epoch = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._batches = self._records = self._stored = self._duplicates = self._malformed = 0
        self._produced = self._commits = self._commit_failures = self._retries = self._abandoned = 0
        self._last_batch_ms = 0.0
        # Next offset per partition after the last records getmany handed out
        # (the consumer's position, kept here so lag() never awaits: position()
        # can wait for an offset reset); lag() reads it with highwater().
        self._positions: dict[TopicPartition, int] = {}
        # Holds back records past a hole in a partition's offsets (the embedded
        # broker can show a later record before an earlier one: roomcast.offsets).
        self._offsets = OffsetGapGuard()
        self._in_group = False
        self._attempts = 0
        self._instance_id = config.instance_id or socket.gethostname()
        self._member_file = MemberFile(config.kafka_bootstrap, CHAT_GROUP, self._instance_id)
        self.watchdog = ConsumerWatchdog(
            stall_bound_s(config.kafka_session_timeout_ms, tuning.rebalance_timeout_ms),
            orphan_after_s=config.kafka_session_timeout_ms / 1000,
        )
        self.member: WatchedMember[AIOKafkaConsumer] | None = None
        self._init_metrics(metrics if metrics is not None else MetricsRegistry())

    def _init_metrics(self, m: MetricsRegistry) -> None:
        self.metrics = m
        m.counter_fn("roomcast_chat_messages_stored_total", "ingest records stored as new messages", lambda: self._stored)
        m.counter_fn(
            "roomcast_chat_duplicates_total", "ingest records that repeated a stored post (re-emitted, not stored)",
            lambda: self._duplicates,
        )
        m.counter_fn("roomcast_chat_malformed_total", "ingest records skipped as undecodable or invalid", lambda: self._malformed)
        m.counter_fn("roomcast_chat_batch_retries_total", "store or produce failures retried", lambda: self._retries)
        m.counter_fn(
            "roomcast_chat_offset_holes_total", "fetches held back at a hole in a partition's offsets",
            lambda: self._offsets.holes_waited,
        )
        m.counter_fn("roomcast_chat_commit_failures_total", "offset commits refused (a rebalance)", lambda: self._commit_failures)
        m.counter_fn(
            "roomcast_chat_batches_abandoned_total", "batches left uncommitted (revoked, or failing at stop)",
            lambda: self._abandoned,
        )
        self.m_batch_records = m.histogram("roomcast_chat_batch_records", "ingest records per fetched batch", SIZE_BUCKETS)
        self.m_store = m.histogram("roomcast_chat_store_latency_seconds", "store_batch of one batch (one transaction)")
        self.m_produce = m.histogram(
            "roomcast_chat_produce_latency_seconds", "producing one batch's events to message.created until all acked"
        )
        m.counter_fn(
            "roomcast_chat_watchdog_actions_total",
            "times the ingest consumer was found stuck (out of its group, or no progress with records waiting) and rejoined or gave up",
            lambda: self.watchdog.actions,
        )
        m.gauge(
            "roomcast_chat_consumer_lag_messages", "message.ingest records on this instance's partitions not yet fetched",
            self.lag,
        )

    @property
    def connected(self) -> bool:
        """The producer is up and the consumer has joined its group, and neither is stuck."""
        stalled_ms = self.member.stalled_for() * 1000 if self.member is not None else 0.0
        return self._producer is not None and self._consumer is not None and stalled_ms < self.config.kafka_session_timeout_ms

    def _member_state(self) -> tuple[bool, int, int]:
        if self._consumer is not None:
            self._member_file.track(self._consumer)
        # Retries of a failing batch and failed connection attempts are signs of life.
        return self._in_group, self.lag(), self._records + self._retries + self._attempts

    def lag(self) -> int:
        """Records on the assigned partitions not yet fetched (roomcast.kafka.consumer_lag). Never raises."""
        consumer = self._consumer
        return 0 if consumer is None else consumer_lag(consumer, self._positions)

    def statistics(self) -> PipelineStatistics:
        return PipelineStatistics(
            self._batches,
            self._records,
            self._stored,
            self._duplicates,
            self._malformed,
            self._produced,
            self._commits,
            self._commit_failures,
            self._retries,
            self._abandoned,
            self._last_batch_ms,
            self.lag(),
        )

    # ---- lifecycle ------------------------------------------------------------

    async def connect(self, stop: asyncio.Event) -> bool:
        """Start the producer; run() starts the consumer (which joins the group, watched).

        Retries with backoff while Kafka is unreachable, logging each failure.
        Returns False if `stop` was set before it started.
        """
        started = time.monotonic()
        producer = await self._started(
            lambda: AIOKafkaProducer(
                bootstrap_servers=self.config.kafka_bootstrap,
                client_id="roomcast-chat",
                acks="all",
                enable_idempotence=False,  # the embedded broker cannot; dedupe is client_msg_id
                linger_ms=self.config.produce_linger_ms,
                request_timeout_ms=self.tuning.request_timeout_ms,
            ),
            lambda producer: producer.start(),
            stop,
        )
        if producer is None:
            return False
        self._producer = producer
        log.info("producing %s to %s (connected in %.1f s)", CREATED_TOPIC, self.config.kafka_bootstrap, time.monotonic() - started)
        return True

    async def _open_consumer(self, stop: asyncio.Event) -> AIOKafkaConsumer | None:
        """A started consumer in group chat-service, retrying while Kafka is away; None once `stop` is set."""
        t = self.tuning
        session_ms = self.config.kafka_session_timeout_ms
        # A killed predecessor of this instance would hold its partitions until
        # its session expires; a static member's are given back to it anyway.
        if not self.config.kafka_static_membership:
            await self._member_file.fence_previous()
        started = time.monotonic()

        def make() -> AIOKafkaConsumer:
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.config.kafka_bootstrap,
                client_id="roomcast-chat",
                group_id=CHAT_GROUP,
                group_instance_id=self._instance_id if self.config.kafka_static_membership else None,
                enable_auto_commit=False,  # commit only after store and produce
                auto_offset_reset="earliest",  # never "latest": broken on Tansu, and loses posts
                fetch_max_wait_ms=self.config.fetch_max_wait_ms,
                max_poll_records=self.config.batch_max,
                session_timeout_ms=session_ms,
                heartbeat_interval_ms=min(t.heartbeat_interval_ms, session_ms // 3),
                rebalance_timeout_ms=t.rebalance_timeout_ms,
                request_timeout_ms=t.request_timeout_ms + session_ms,
            )
            consumer.subscribe([INGEST_TOPIC], listener=_Listener(self, consumer))
            return consumer

        consumer = await self._started(make, self._member_file.start, stop)
        if consumer is not None:
            self._consumer = consumer
            log.info(
                "consuming %s as group %s from %s (joined in %.1f s)",
                INGEST_TOPIC, CHAT_GROUP, self.config.kafka_bootstrap, time.monotonic() - started,
            )
        return consumer

    async def _started(
        self, make: Callable[[], Client], start: Callable[[Client], Awaitable[None]], stop: asyncio.Event
    ) -> Client | None:
        """make() a Kafka client and start() it, retrying with backoff while Kafka is away.

        None once `stop` is set. Cancelled (the watchdog gave up on a join that
        hangs), it closes the client it was starting. Each failed attempt counts
        as progress for the watchdog: a member that cannot reach Kafka waits.
        """
        t = self.tuning
        delay = t.retry_initial_s
        attempt = 0
        while not stop.is_set():
            attempt += 1
            self._attempts += 1
            client = make()
            try:
                await _until_stopped(start(client), stop)
                return client
            except (KafkaError, OSError, TimeoutError, _Stopped) as exc:
                await _stop_quietly(client)
                if isinstance(exc, _Stopped):
                    return None
                log.warning(
                    "kafka at %s is not reachable (attempt %d: %s); retrying in %.1f s",
                    self.config.kafka_bootstrap, attempt, exc or type(exc).__name__, delay,
                )
                await _sleep_unless(stop, delay)
                delay = min(delay * 2, t.connect_retry_max_s)
            except BaseException:
                await _stop_quietly(client)
                raise
        return None

    async def aclose(self) -> None:
        """Leave the group, flush and close the producer. Idempotent.

        Call after run() returned: the in-flight batch is then finished or
        abandoned, and what was done is committed.
        """
        if self._closed:
            return
        self._closed = True
        consumer, producer = self._consumer, self._producer
        self._consumer = self._producer = None
        if consumer is not None:
            await self._close_consumer(consumer)
        await _stop_quietly(producer)

    async def _close_consumer(self, consumer: AIOKafkaConsumer) -> None:
        self._in_group = False
        await _leave_generation_zero(consumer)
        try:
            await asyncio.wait_for(consumer.stop(), self.tuning.revoke_grace_s + 2.0)
            self._member_file.forget()
        except Exception as exc:  # a stuck member must not hold its successor back
            log.warning("closing the consumer failed (%r); its session will expire", exc)
        if self._consumer is consumer:
            self._consumer = None

    # ---- the loop -------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Process batches until `stop` is set. Call after connect() returned True.

        Returns once the in-flight batch is committed or abandoned. Transient
        Kafka and store failures are retried here; a member stuck out of its
        group, or without progress while records wait, rejoins with a fresh
        consumer (roomcast.watchdog). Raises ConsumerStalled when rejoining
        did not help, and any unexpected exception (a bug).
        """
        if self._producer is None:
            raise RuntimeError("connect() first")

        self.member = WatchedMember(
            "the ingest pipeline",
            self.watchdog,
            connect=lambda: self._open_consumer(stop),
            consume=lambda consumer: self._consume(consumer, stop),
            close=self._close_consumer,
            state=self._member_state,
            stop=stop,
            stop_grace_s=self.tuning.shutdown_grace_s + self.tuning.revoke_grace_s,
            topic=INGEST_TOPIC,
        )
        await self.member.run()

    async def _consume(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        delay = self.tuning.retry_initial_s
        while not stop.is_set():
            try:
                batch = await consumer.getmany(
                    timeout_ms=self.tuning.poll_timeout_ms, max_records=self.config.batch_max
                )
            except KafkaError as exc:
                log.warning("fetch from %s failed (%s); retrying in %.1f s", INGEST_TOPIC, exc, delay)
                await _sleep_unless(stop, delay)
                delay = min(delay * 2, self.tuning.retry_max_s)
                continue
            delay = self.tuning.retry_initial_s
            batch = await contiguous(consumer, self._offsets, batch)
            for tp, messages in batch.items():
                self._positions[tp] = messages[-1].offset + 1
            if batch:
                await self._handle(batch, stop)

    async def _handle(self, batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]], stop: asyncio.Event) -> None:
        epoch = self._epoch
        started = time.perf_counter()
        self._idle.clear()
        try:
            records: list[IngestRecord] = []
            offsets: dict[TopicPartition, int] = {}
            for tp, messages in batch.items():
                for message in messages:
                    record = self._decode(tp, message)
                    if record is not None:
                        records.append(record)
                offsets[tp] = messages[-1].offset + 1
            self._batches += 1
            fetched = sum(len(m) for m in batch.values())
            self._records += fetched
            self.m_batch_records.observe(fetched)
            if not await self._store_and_produce(records, epoch, stop):
                self._abandoned += 1
                return
            await self._commit(offsets)
            self._last_batch_ms = (time.perf_counter() - started) * 1000
        finally:
            self._idle.set()

    def _decode(self, tp: TopicPartition, message: ConsumerRecord[bytes, bytes]) -> IngestRecord | None:
        value, offset = message.value, message.offset
        try:
            if value is None:
                raise ValueError("record has no value")
            record = decode_ingest(value)
        except (msgspec.DecodeError, ValueError) as exc:
            self._malformed += 1
            log.warning("skipping malformed ingest record %s[%d]@%d: %s", tp.topic, tp.partition, offset, exc)
            return None
        reason = validate_ingest(record, self.config.max_body_bytes)
        if reason is not None:
            self._malformed += 1
            log.warning(
                "skipping invalid ingest record %s[%d]@%d (room %.128r, client_msg_id %.64r): %s",
                tp.topic, tp.partition, offset, record.room, record.client_msg_id, reason,
            )
            return None
        return record

    async def _store_and_produce(self, records: list[IngestRecord], epoch: int, stop: asyncio.Event) -> bool:
        """True once every record is stored and its event acked; False if the batch was abandoned."""
        t = self.tuning
        delay = t.retry_initial_s
        give_up_at: float | None = None
        # Stored by any attempt: a retry after a failed produce gets the
        # records back as duplicates, but this batch stored them.
        created = [False] * len(records)
        while True:
            if epoch != self._epoch:
                log.warning("partitions were revoked mid-batch: abandoning it uncommitted (%d records)", len(records))
                return False
            try:
                started = time.perf_counter()
                stored = await self.store.store_batch(records, self._clock_ms()) if records else []
                if stored:
                    self.m_store.observe(time.perf_counter() - started)
                created = [c or s.created for c, s in zip(created, stored)]
                if epoch != self._epoch:
                    continue  # revoked while storing: the new owner produces these
                started = time.perf_counter()
                await self._produce(stored)
                if stored:
                    self.m_produce.observe(time.perf_counter() - started)
                self._stored += sum(created)
                self._duplicates += len(created) - sum(created)
                return True
            except _TRANSIENT as exc:
                self._retries += 1
                now = time.monotonic()
                if stop.is_set():
                    give_up_at = give_up_at or now + t.shutdown_grace_s
                    if now >= give_up_at:
                        log.warning("stopping: abandoning a failing batch uncommitted (%d records)", len(records))
                        return False
                log.warning(
                    "batch of %d records failed (%s: %s); retrying in %.2f s, nothing committed",
                    len(records), type(exc).__name__, exc, delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, t.retry_max_s)

    async def _produce(self, stored: list[StoredMessage]) -> None:
        """Send every event in order and wait for all acks. Raises the first failure."""
        producer = self._producer
        assert producer is not None
        futures = [
            await producer.send(CREATED_TOPIC, value=encode_event(s.event), key=s.event.room.encode())
            for s in stored
        ]
        # return_exceptions: every future is awaited, so none leaves an unretrieved error behind.
        results = await asyncio.gather(*futures, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        self._produced += len(futures)

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            await consumer.commit(offsets)
            self._commits += 1
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            # The group moved on (rebalance): the new owner re-consumes from the
            # last commit, and dedupe makes that harmless.
            self._commit_failures += 1
            log.warning("commit of %s failed (%s); those records will be re-consumed", _describe(offsets), exc)

    # ---- rebalance --------------------------------------------------------------

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        if not self._idle.is_set():
            log.info("partitions revoked mid-batch; waiting up to %.1f s for it to finish", self.tuning.revoke_grace_s)
            try:
                await asyncio.wait_for(self._idle.wait(), self.tuning.revoke_grace_s)
            except TimeoutError:
                pass  # the batch sees the new epoch and abandons itself
        self._epoch += 1
        self._positions.clear()  # refreshed after the next fetch
        self._offsets.forget(revoked)
        if revoked:
            log.info("partitions revoked: %s", _describe_tps(revoked))

    def _on_assigned(self, consumer: AIOKafkaConsumer, assigned: set[TopicPartition]) -> None:
        self._offsets.forget(assigned)  # they start from their committed offsets
        self._in_group = True
        self._member_file.track(consumer)
        log.info("partitions assigned: %s", _describe_tps(assigned) or "none")


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, pipeline: IngestPipeline, consumer: AIOKafkaConsumer) -> None:
        self._pipeline = pipeline
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._pipeline._in_group = False
        await self._pipeline._on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._pipeline._on_assigned(self._consumer, set(assigned))


class _Stopped(Exception):
    pass


async def _until_stopped(coro: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
    """Await `coro`; raise _Stopped (after cancelling it) if `stop` is set first."""
    task = asyncio.ensure_future(coro)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task.done():
        task.result()
        return
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)  # still raises if we are cancelled ourselves
    raise _Stopped()


async def _sleep_unless(stop: asyncio.Event, delay_s: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), delay_s)
    except TimeoutError:
        pass


async def _stop_quietly(*clients: AIOKafkaConsumer | AIOKafkaProducer | None) -> None:
    for client in clients:
        if client is None:
            continue
        try:
            await client.stop()
        except Exception as exc:  # closing: nothing left to save
            log.warning("closing %s failed: %s", type(client).__name__, exc)


async def _leave_generation_zero(consumer: AIOKafkaConsumer) -> None:
    """Send LeaveGroup when the generation is 0, which aiokafka skips (Tansu starts at 0).

    Without it the next member waits out this one's session timeout (~11 s
    measured with a 6 s session). Real Kafka starts at generation 1: no-op.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or getattr(coordinator, "generation", None) != 0 or not coordinator.member_id:
        return
    try:
        await asyncio.wait_for(coordinator._send_req(LeaveGroupRequest(coordinator.group_id, coordinator.member_id)), 2.0)
    except Exception as exc:
        log.debug("LeaveGroup for generation 0 failed: %s", exc)


def _describe_tps(tps: set[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps))


def _describe(offsets: dict[TopicPartition, int]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]@{off}" for tp, off in sorted(offsets.items()))
