"""The ingest pipeline: Kafka `message.ingest` -> store -> Kafka `message.created`.

One batch at a time, in one task, so a partition's records keep their order
from fetch to produce:

1. `getmany` up to `batch_max` records (group `chat-service`, no auto-commit).
2. Decode and validate each; a malformed one is logged, counted and skipped.
3. `store.store_batch` the rest in one transaction: per-room seq, dedupe.
4. Produce every resulting event (new or re-emitted duplicate) to
   `message.created`, key = room, in record order, and wait for all acks.
5. Only then commit the batch's offsets (PROTOCOL.md 4): a commit before the
   produce would lose the batch to a crash in between.

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

Group membership, rebalances, contiguous fetches, lag and liveness are
roomcast.kafka.consumer's (the gateway relay is the same kind of member).

The broker's engine (kafka_profile) picks the fetch wait and whether the
producer is idempotent (roomcast.config.BROKER_PROFILES).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord

from chat.core.validation import validate_ingest
from chat.storage.base import MessageStore, StoredMessage, StoreError
from roomcast.config import ChatConfig, KafkaTuning, broker_profile
from roomcast.kafka.clients import Retry, start_with_retry, stop_quietly
from roomcast.kafka.consumer import GroupConsumer, MemberSettings
from roomcast.kafka.offsets import Fetched
from roomcast.metrics import SIZE_BUCKETS, MetricsRegistry
from roomcast.wire.events import CHAT_GROUP, CREATED_TOPIC, INGEST_TOPIC, IngestRecord, decode_ingest, encode_event

__all__ = ["IngestPipeline", "KafkaTuning", "PipelineStatistics", "wall_clock_ms"]

log = logging.getLogger("roomcast.chat.kafka")

# Failures worth retrying: the database or Kafka is away for a while.
_TRANSIENT = (StoreError, KafkaError, OSError, TimeoutError)


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


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


class IngestPipeline(GroupConsumer):
    """Consumes message.ingest, stores, produces message.created, commits.

    Call `await connect(stop)` once (starts the producer, retrying until Kafka
    answers or `stop` is set), then `await run(stop)` (the group member, until
    `stop` is set), then `await aclose()`. Its metrics go into `metrics` (a
    registry of its own when None). Raises ValueError when config.batch_max
    is below 1.
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
        session_ms = config.kafka_session_timeout_ms
        super().__init__(
            "the ingest pipeline",
            MemberSettings(
                bootstrap=config.kafka_bootstrap,
                group=CHAT_GROUP,
                topic=INGEST_TOPIC,
                client_id="roomcast-chat",
                member_name=config.instance_id or socket.gethostname(),
                session_timeout_ms=session_ms,
                rebalance_timeout_ms=tuning.rebalance_timeout_ms,
                heartbeat_interval_ms=min(tuning.heartbeat_interval_ms, session_ms // 3),
                fetch_max_wait_ms=broker_profile(config).fetch_max_wait_ms,
                max_records=config.batch_max,
                static=config.kafka_static_membership,
                poll_timeout_ms=tuning.poll_timeout_ms,
                request_timeout_ms=tuning.request_timeout_ms + session_ms,
                revoke_grace_s=tuning.revoke_grace_s,
                stop_grace_s=tuning.shutdown_grace_s + tuning.revoke_grace_s,
                retry=Retry(tuning.retry_initial_s, tuning.retry_max_s),
                connect_retry=Retry(tuning.retry_initial_s, tuning.connect_retry_max_s),
            ),
        )
        self.config = config
        self.store = store
        self.tuning = tuning
        self._clock_ms = clock_ms
        self._producer: AIOKafkaProducer | None = None
        self._closed = False
        self._batches = self._records = self._stored = self._duplicates = self._malformed = 0
        self._produced = self._commits = self._commit_failures = self._abandoned = 0
        self._last_batch_ms = 0.0
        self._init_metrics(metrics if metrics is not None else MetricsRegistry())

    def _init_metrics(self, m: MetricsRegistry) -> None:
        self.metrics = m
        m.counter_fn("roomcast_chat_messages_stored_total", "ingest records stored as new messages", lambda: self._stored)
        m.counter_fn(
            "roomcast_chat_duplicates_total", "ingest records that repeated a stored post (re-emitted, not stored)",
            lambda: self._duplicates,
        )
        m.counter_fn("roomcast_chat_malformed_total", "ingest records skipped as undecodable or invalid", lambda: self._malformed)
        m.counter_fn("roomcast_chat_batch_retries_total", "store or produce failures retried", lambda: self.retries)
        m.counter_fn(
            "roomcast_chat_offset_holes_total", "fetches held back at a hole in a partition's offsets",
            lambda: self.offsets.holes_waited,
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
        return self._producer is not None and self.live

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
            self.retries,
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

        def failed() -> None:
            self.attempts += 1

        producer = await start_with_retry(
            lambda: AIOKafkaProducer(
                bootstrap_servers=self.config.kafka_bootstrap,
                client_id="roomcast-chat",
                acks="all",
                # Not on the embedded broker (no InitProducerId); dedupe is client_msg_id anyway.
                enable_idempotence=broker_profile(self.config).idempotent_producer,
                linger_ms=self.config.produce_linger_ms,
                request_timeout_ms=self.tuning.request_timeout_ms,
            ),
            lambda producer: producer.start(),
            stop,
            what="the chat producer", bootstrap=self.config.kafka_bootstrap, retry=self.settings.connect_retry,
            on_failure=failed,
        )
        if producer is None:
            return False
        self._producer = producer
        log.info("producing %s to %s (connected in %.1f s)", CREATED_TOPIC, self.config.kafka_bootstrap, time.monotonic() - started)
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Process batches until `stop` is set. Call after connect() returned True.

        Returns once the in-flight batch is committed or abandoned. Transient
        Kafka and store failures are retried here; raises ConsumerStalled
        when rejoining did not help (roomcast.kafka.consumer), and any
        unexpected exception (a bug).
        """
        if self._producer is None:
            raise RuntimeError("connect() first")
        await super().run(stop)

    async def aclose(self) -> None:
        """Leave the group if still in it, flush and close the producer. Idempotent.

        Call after run() returned: the in-flight batch is then finished or
        abandoned, and what was done is committed.
        """
        if self._closed:
            return
        self._closed = True
        if self.consumer is not None:
            await self._close(self.consumer)
        producer, self._producer = self._producer, None
        await stop_quietly(producer)

    # ---- a batch ----------------------------------------------------------------

    async def handle(self, consumer: AIOKafkaConsumer, batch: Fetched, epoch: int) -> None:
        started = time.perf_counter()
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
        if not await self._store_and_produce(records, epoch):
            self._abandoned += 1
            return
        await self._commit(consumer, offsets)
        self._last_batch_ms = (time.perf_counter() - started) * 1000

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

    async def _store_and_produce(self, records: list[IngestRecord], epoch: int) -> bool:
        """True once every record is stored and its event acked; False if the batch was abandoned."""
        t = self.tuning
        delay = t.retry_initial_s
        give_up_at: float | None = None
        # Stored by any attempt: a retry after a failed produce gets the
        # records back as duplicates, but this batch stored them.
        created = [False] * len(records)
        while True:
            if epoch != self.epoch:
                log.warning("partitions were revoked mid-batch: abandoning it uncommitted (%d records)", len(records))
                return False
            try:
                started = time.perf_counter()
                stored = await self.store.store_batch(records, self._clock_ms()) if records else []
                if stored:
                    self.m_store.observe(time.perf_counter() - started)
                created = [c or s.created for c, s in zip(created, stored)]
                if epoch != self.epoch:
                    continue  # revoked while storing: the new owner produces these
                started = time.perf_counter()
                await self._produce(stored)
                if stored:
                    self.m_produce.observe(time.perf_counter() - started)
                self._stored += sum(created)
                self._duplicates += len(created) - sum(created)
                return True
            except _TRANSIENT as exc:
                self.retries += 1
                now = time.monotonic()
                if self.stopping:
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

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        try:
            await consumer.commit(offsets)
            self._commits += 1
        except (CommitFailedError, IllegalStateError, KafkaError) as exc:
            # The group moved on (rebalance): the new owner re-consumes from the
            # last commit, and dedupe makes that harmless.
            self._commit_failures += 1
            log.warning("commit of %s failed (%s); those records will be re-consumed", _describe(offsets), exc)


def _describe(offsets: dict[TopicPartition, int]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]@{off}" for tp, off in sorted(offsets.items()))
