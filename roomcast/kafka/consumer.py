"""A consumer-group member, as both services run one: join, fetch, hand out batches, stay live.

`GroupConsumer.run(stop)` is the one lifecycle: it joins the group (retrying
while the broker is away, fencing a killed predecessor first), fetches,
admits only contiguous records (roomcast.offsets: the embedded broker can
show a later record before an earlier one), hands each batch to the
subclass's `handle`, and leaves the group when `stop` is set. It runs under
a watchdog (roomcast.kafka.membership): a member stuck out of its group or
without progress rejoins with a fresh consumer, and one that stays stuck
makes `run` raise ConsumerStalled so its process is started afresh.

A revocation waits (bounded) for the batch in hand; past the bound the group
goes on, the epoch moves, and `handle` sees it and must not commit (the new
owner consumes those records again; both services make a redelivery
harmless). What a batch means (publish it, or store and produce it) and when
it is committed is the subclass's.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from roomcast.kafka.clients import Backoff, Retry, leave_generation_zero, start_with_retry
from roomcast.kafka.membership import MemberFile, WatchedMember
from roomcast.kafka.offsets import Fetched, consumer_lag, contiguous
from roomcast.offsets import OffsetGapGuard
from roomcast.watchdog import ConsumerWatchdog, stall_bound_s

__all__ = ["GroupConsumer", "MemberSettings"]

log = logging.getLogger("roomcast.kafka.consumer")


@dataclass(frozen=True)
class MemberSettings:
    """How one group member joins and fetches."""

    bootstrap: str
    group: str
    topic: str
    client_id: str
    # Unique among the group's live members: names the MemberFile and, with
    # `static`, is the group.instance.id (a restart takes its partitions back).
    member_name: str
    session_timeout_ms: int
    rebalance_timeout_ms: int
    heartbeat_interval_ms: int
    fetch_max_wait_ms: int
    max_records: int
    static: bool = False
    poll_timeout_ms: int = 200  # getmany wait when idle: bounds how fast a stop is seen
    request_timeout_ms: int = 40_000
    revoke_grace_s: float = 2.0  # how long a revocation waits for the batch in hand
    stop_grace_s: float = 10.0  # how long a stop waits for the consume loop
    retry: Retry = field(default_factory=Retry)  # fetch and handle failures
    connect_retry: Retry = field(default_factory=lambda: Retry(0.1, 5.0))


class GroupConsumer(abc.ABC):
    """One member of a consumer group; subclasses implement `handle`.

    `retriable`: the exceptions of `handle` after which the batch is fetched
    again (after a backoff); anything else ends `run` (a bug).
    """

    retriable: tuple[type[BaseException], ...] = ()

    def __init__(self, name: str, settings: MemberSettings) -> None:
        self.name = name
        self.settings = settings
        self.consumer: AIOKafkaConsumer | None = None
        self.in_group = False
        # Bumped at every revocation: a batch of an older epoch must not commit.
        self.epoch = 0
        self.fetched = 0
        self.attempts = 0  # failed connection attempts
        self.retries = 0  # batches failed and tried again
        self.commits = 0
        self.commit_failures = 0
        # Offsets to commit, and the one commit in flight (commit_later).
        self._to_commit: dict[TopicPartition, int] = {}
        self._committer: asyncio.Future[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        # Next offset per partition after what was handed out: lag() reads it
        # with highwater() and never awaits (position() can wait for a reset).
        self._positions: dict[TopicPartition, int] = {}
        self.offsets = OffsetGapGuard()
        self.member_file = MemberFile(settings.bootstrap, settings.group, settings.member_name)
        self.watchdog = ConsumerWatchdog(
            stall_bound_s(settings.session_timeout_ms, settings.rebalance_timeout_ms),
            orphan_after_s=settings.session_timeout_ms / 1000,
        )
        self.member: WatchedMember[AIOKafkaConsumer] | None = None
        self._stop: asyncio.Event | None = None

    @abc.abstractmethod
    async def handle(self, consumer: AIOKafkaConsumer, batch: Fetched, epoch: int) -> None:
        """Process one batch of contiguous records, in partition order.

        Return when it is done, or abandoned because `self.epoch` moved past
        `epoch` (a revocation: do not commit). Raise one of `retriable` to
        have the batch fetched again.
        """

    # ---- state ----------------------------------------------------------------

    def lag(self) -> int:
        """Records on the assigned partitions not yet handed out (roomcast.kafka.offsets.consumer_lag)."""
        consumer = self.consumer
        return 0 if consumer is None else consumer_lag(consumer, self._positions)

    def stalled_for(self) -> float:
        return self.member.stalled_for() if self.member is not None else 0.0

    @property
    def live(self) -> bool:
        """Joined, and not stuck for longer than a session (feeds readiness)."""
        return self.consumer is not None and self.stalled_for() * 1000 < self.settings.session_timeout_ms

    @property
    def stopping(self) -> bool:
        """`run`'s stop is set: a batch that keeps failing should give up soon."""
        return self._stop is not None and self._stop.is_set()

    def progress(self) -> int:
        """What the watchdog counts as life: records fetched, retries, connection attempts."""
        return self.fetched + self.retries + self.attempts

    def _state(self) -> tuple[bool, int, int]:
        if self.consumer is not None:
            self.member_file.track(self.consumer)
        return self.in_group, self.lag(), self.progress()

    # ---- the lifecycle --------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Be a member until `stop` is set; leaves the group before returning.

        Raises ConsumerStalled when rejoining did not help, and whatever
        `handle` raised that is not retriable.
        """
        self._stop = stop
        self.member = WatchedMember(
            self.name,
            self.watchdog,
            connect=lambda: self._open(stop),
            consume=lambda consumer: self._consume(consumer, stop),
            close=self._close,
            state=self._state,
            stop=stop,
            stop_grace_s=self.settings.stop_grace_s,
            topic=self.settings.topic,
        )
        await self.member.run()

    def _make_consumer(self) -> AIOKafkaConsumer:
        s = self.settings
        consumer = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap,
            group_id=s.group,
            client_id=s.client_id,
            group_instance_id=s.member_name if s.static else None,
            enable_auto_commit=False,  # the subclass commits after the batch is done
            auto_offset_reset="earliest",  # never "latest": wrong on the embedded broker, and it loses records
            fetch_max_wait_ms=s.fetch_max_wait_ms,
            max_poll_records=s.max_records,
            session_timeout_ms=s.session_timeout_ms,
            heartbeat_interval_ms=s.heartbeat_interval_ms,
            rebalance_timeout_ms=s.rebalance_timeout_ms,
            max_poll_interval_ms=max(60_000, s.rebalance_timeout_ms),
            request_timeout_ms=s.request_timeout_ms,
        )
        consumer.subscribe([s.topic], listener=_Listener(self, consumer))
        return consumer

    async def _open(self, stop: asyncio.Event) -> AIOKafkaConsumer | None:
        s = self.settings
        # A killed predecessor would hold its partitions until its session
        # expires; a static member's are given back to it anyway.
        if not s.static:
            await self.member_file.fence_previous()
        started = time.monotonic()

        def failed() -> None:
            self.attempts += 1

        consumer = await start_with_retry(
            self._make_consumer, self.member_file.start, stop,
            what=self.name, bootstrap=s.bootstrap, retry=s.connect_retry, on_failure=failed,
        )
        if consumer is not None:
            self.consumer = consumer
            log.info("%s: consuming %s as group %s (joined in %.1f s)", self.name, s.topic, s.group, time.monotonic() - started)
        return consumer

    async def _close(self, consumer: AIOKafkaConsumer) -> None:
        """Leave the group (bounded: a stuck member must not hold its successor back)."""
        self.in_group = False
        self.offsets.forget(list(consumer.assignment()))
        self._positions.clear()
        await self._flush_commits()
        await leave_generation_zero(consumer)
        try:
            await asyncio.wait_for(consumer.stop(), self.settings.revoke_grace_s + 2.0)
            self.member_file.forget()
        except Exception as exc:
            log.warning("%s: closing the consumer failed (%r); its session will expire", self.name, exc)
        if self.consumer is consumer:
            self.consumer = None

    async def _consume(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> None:
        s = self.settings
        backoff = Backoff(s.retry)
        while not stop.is_set():
            try:
                batch = await consumer.getmany(timeout_ms=s.poll_timeout_ms, max_records=s.max_records)
            except KafkaError as exc:
                log.warning("%s: fetching %s failed (%s); retrying", self.name, s.topic, exc)
                await backoff.wait(stop)
                continue
            if not batch:
                continue
            self.fetched += sum(len(records) for records in batch.values())
            batch = await contiguous(consumer, self.offsets, batch)
            if not batch:
                continue
            for tp, records in batch.items():
                self._positions[tp] = records[-1].offset + 1
            self._idle.clear()
            try:
                await self.handle(consumer, batch, self.epoch)
                backoff.reset()
                continue
            except self.retriable as exc:
                self.retries += 1
                log.warning("%s: a batch failed (%r); fetching it again", self.name, exc)
                self._rewind(consumer, batch)
            finally:
                self._idle.set()
            await backoff.wait(stop)  # outside the batch: a revocation need not wait for it

    def commit_later(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        """Commit `offsets` off the batch's path: the next batch does not wait for the broker's answer.

        At most one commit is in flight; offsets given meanwhile are merged and
        committed after it. A commit that fails (a rebalance) is counted and
        logged: the new owner consumes those records again, which both
        services make harmless. Revocations and closes wait for it (bounded).
        """
        self._to_commit.update(offsets)
        if self._committer is None or self._committer.done():
            self._committer = asyncio.ensure_future(self._commit_pending(consumer))

    async def _commit_pending(self, consumer: AIOKafkaConsumer) -> None:
        while self._to_commit:
            offsets, self._to_commit = self._to_commit, {}
            try:
                await asyncio.wait_for(consumer.commit(offsets), self.settings.revoke_grace_s + 3.0)
                self.commits += 1
            except (KafkaError, asyncio.TimeoutError) as exc:
                self.commit_failures += 1
                log.warning("%s: committing %s failed (%r); those records will be consumed again", self.name, _describe(set(offsets)), exc)

    async def _flush_commits(self) -> None:
        committer = self._committer
        if committer is not None and not committer.done():
            try:
                await asyncio.wait_for(asyncio.shield(committer), self.settings.revoke_grace_s)
            except asyncio.TimeoutError:
                log.warning("%s: a commit did not finish within %.0f s; going on without it", self.name, self.settings.revoke_grace_s)

    def _rewind(self, consumer: AIOKafkaConsumer, batch: Fetched) -> None:
        for tp, records in batch.items():
            if tp in consumer.assignment():
                consumer.seek(tp, records[0].offset)
                self.offsets.expect(tp, records[0].offset)
                self._positions[tp] = records[0].offset

    # ---- rebalance ---------------------------------------------------------------

    async def _revoked(self, revoked: set[TopicPartition]) -> None:
        self.in_group = False
        if not self._idle.is_set():
            try:
                await asyncio.wait_for(self._idle.wait(), self.settings.revoke_grace_s)
            except TimeoutError:
                log.warning(
                    "%s: a batch held up the revocation of %s for %.0f s; going on without it",
                    self.name, _describe(revoked), self.settings.revoke_grace_s,
                )
        await self._flush_commits()  # what was done is committed before the partitions move
        self.epoch += 1
        self._positions.clear()  # refreshed after the next fetch
        self.offsets.forget(revoked)
        if revoked:
            log.info("%s: partitions revoked: %s", self.name, _describe(revoked))

    def _assigned(self, consumer: AIOKafkaConsumer, assigned: set[TopicPartition]) -> None:
        self.offsets.forget(assigned)  # they start from their committed offsets
        self.in_group = True
        self.member_file.track(consumer)
        log.info("%s: partitions assigned: %s", self.name, _describe(assigned) or "none")


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, member: GroupConsumer, consumer: AIOKafkaConsumer) -> None:
        self._member = member
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._member._revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self._member._assigned(self._consumer, set(assigned))


def _describe(tps: set[TopicPartition]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(tps))
