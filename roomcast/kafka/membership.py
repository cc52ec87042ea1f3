"""The liveness of a consumer-group member: shared by the gateway relay and the chat ingest pipeline.

- `WatchedMember` runs a member under a watchdog (roomcast.watchdog): a
  member stuck out of its group, or without progress while records wait,
  leaves and rejoins with a fresh consumer; one that stays stuck raises
  `ConsumerStalled` so its process exits and is started afresh. It also asks
  the group to rebalance when another member's partitions look orphaned.
- `MemberFile` lets a restarted worker drop its killed predecessor from the
  group at once instead of waiting out the predecessor's session.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer
from aiokafka.client import AIOKafkaClient, CoordinationType
from aiokafka.errors import KafkaError
from aiokafka.protocol.admin import DescribeGroupsRequest
from aiokafka.protocol.group import LeaveGroupRequest

from roomcast.kafka.offsets import unowned_offsets
from roomcast.watchdog import ConsumerWatchdog, Verdict

__all__ = ["ConsumerStalled", "MemberFile", "WatchedMember"]

log = logging.getLogger("roomcast.kafka.membership")


class ConsumerStalled(RuntimeError):
    """A group member stayed stuck through its rejoins: the process should exit non-zero."""


class MemberFile:
    """Where a worker keeps its current group member id, so its next incarnation can drop it.

    A member killed with -9 sends no LeaveGroup: its group waits out its
    session before anyone gets its partitions, and the embedded broker waits
    longer still when the restarted worker joins meanwhile (README, "Limits").
    A restarted worker that knows its predecessor's member id sends that
    LeaveGroup itself, so the group rebalances at once. The file is keyed by
    the bootstrap servers, the group and the worker's name, which must be
    unique among the group's live members.
    """

    def __init__(self, bootstrap: str, group: str, name: str, directory: Path | None = None) -> None:
        digest = hashlib.sha1(f"{bootstrap}|{group}|{name}".encode()).hexdigest()[:16]
        base = directory or Path(tempfile.gettempdir()) / "roomcast-members"
        self.path = base / f"{group}-{digest}"
        self.bootstrap = bootstrap
        self.group = group
        self._kept = ""

    def track(self, consumer: AIOKafkaConsumer) -> None:
        """Keep the consumer's member id once the broker has given it one (cheap; call often).

        Kept from the first JoinGroup answer, not from the assignment: an
        incarnation killed while it joins must be dropped too.
        """
        member_id = getattr(getattr(consumer, "_coordinator", None), "member_id", "")
        if member_id and member_id != self._kept:
            self.remember(member_id)

    async def start(self, consumer: AIOKafkaConsumer) -> None:
        """consumer.start() (which joins the group), keeping the member id as soon as the broker gives it."""
        starting = asyncio.ensure_future(consumer.start())
        try:
            while not starting.done():
                await asyncio.wait({starting}, timeout=0.05)
                self.track(consumer)
        finally:
            if not starting.done():
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
        starting.result()

    def remember(self, member_id: str) -> None:
        self._kept = member_id
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(f"{member_id} {os.getpid()} {_started_at(os.getpid())}")
        except OSError as exc:  # only a faster failover is lost
            log.debug("could not keep the member id in %s: %s", self.path, exc)

    def forget(self) -> None:
        self._kept = ""
        self.path.unlink(missing_ok=True)

    async def fence_previous(self, timeout_s: float = 3.0) -> bool:
        """Send LeaveGroup for the member id a previous incarnation left behind. True if one was sent.

        Only for a process that is gone: a live process that wrote the file
        is another member under the same name, and is left alone.
        """
        try:
            member_id, pid, started = self.path.read_text().split()
        except (OSError, ValueError):
            return False
        if started != "?" and _started_at(int(pid)) == started:
            log.warning("another live process (pid %s) is a member of %s under this name; give each its own", pid, self.group)
            return False
        client = AIOKafkaClient(bootstrap_servers=self.bootstrap, request_timeout_ms=int(timeout_s * 1000))
        try:
            await asyncio.wait_for(client.bootstrap(), timeout_s)
            node = await asyncio.wait_for(client.coordinator_lookup(CoordinationType.GROUP, self.group), timeout_s)
            described = await asyncio.wait_for(client.send(node, DescribeGroupsRequest([self.group])), timeout_s)
            state = described.groups[0][2] if described.groups else ""
            if state != "Stable":
                # Mid-rebalance, the embedded broker keeps a leader that left as the
                # group's leader, and the group never settles again: let the
                # session expire instead (README, "Limits").
                log.info("%s is %s, not Stable: leaving the previous member %s to its session", self.group, state or "unknown", member_id)
                return False
            await asyncio.wait_for(client.send(node, LeaveGroupRequest(self.group, member_id)), timeout_s)
        except (KafkaError, OSError, asyncio.TimeoutError) as exc:
            log.info("could not drop the previous member %s of %s (%r); its session will expire", member_id, self.group, exc)
            return False
        finally:
            await client.close()
        self.forget()
        log.info("dropped the previous incarnation's member %s from %s", member_id, self.group)
        return True


def _started_at(pid: int) -> str:
    """When process pid started (clock ticks since boot), which tells a reused pid apart; '?' if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


Consumer = TypeVar("Consumer")


class WatchedMember(Generic[Consumer]):
    """Runs one group member and keeps it live: a stuck member rejoins with a fresh consumer.

    With `topic`, it also looks at the partitions other members own, every
    GROUP_CHECK_S: one with records waiting whose committed offset stands
    still past the bound has lost its owner without the group noticing, and
    this member asks the group to rebalance (roomcast.watchdog, REBALANCE).

    `connect()` returns a started consumer, which has joined the group
    (retrying while the broker is away; None once `stop` is set); it is
    watched too, since a join can hang. `consume(consumer)` runs the member's
    loop until `stop` is set, `close(consumer)` leaves the group. `state()`
    tells the watchdog (in the group, lag, a progress counter that connection
    attempts move too) twice a second. After `watchdog.max_rejoins` rejoins
    that did not help, `run` raises ConsumerStalled. The caller owns `stop`.
    """

    PERIOD_S = 0.5
    GROUP_CHECK_S = 2.0

    def __init__(
        self,
        name: str,
        watchdog: ConsumerWatchdog,
        *,
        connect: Callable[[], Awaitable[Consumer | None]],
        consume: Callable[[Consumer], Awaitable[None]],
        close: Callable[[Consumer], Awaitable[None]],
        state: Callable[[], tuple[bool, int, int]],
        stop: asyncio.Event,
        stop_grace_s: float = 10.0,
        topic: str | None = None,
    ) -> None:
        self.name = name
        self.topic = topic
        self.rebalances = 0
        self.watchdog = watchdog
        self._connect, self._consume, self._close, self._state = connect, consume, close, state
        self.stop = stop
        self.stop_grace_s = stop_grace_s
        self.rejoins = 0

    def stalled_for(self) -> float:
        return self.watchdog.stalled_for(time.monotonic())

    async def run(self) -> None:
        while not self.stop.is_set():
            # connect() must close a consumer it started when it is cancelled.
            connecting = asyncio.ensure_future(self._connect())
            verdict = await self._watch(connecting)
            if not connecting.done():
                connecting.cancel()
                await asyncio.gather(connecting, return_exceptions=True)
                if verdict is Verdict.OK:
                    return  # stopping
                self._rejoining(verdict, "joining")
                continue
            consumer = connecting.result()
            if consumer is None:
                return
            task = asyncio.ensure_future(self._consume(consumer))
            verdict = await self._watch(task, consumer)
            if verdict is Verdict.OK:  # stopping, or the loop ended
                await self._finish(task, consumer)
                return
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await self._close(consumer)
            self._rejoining(verdict, "consuming")

    def _rejoining(self, verdict: Verdict, doing: str) -> None:
        reason = self.watchdog.last_reason
        if verdict is Verdict.EXIT:
            raise ConsumerStalled(f"{self.name}: {reason} while {doing}, after {self.watchdog.max_rejoins} rejoins")
        self.rejoins += 1
        self.watchdog.rejoined(time.monotonic())
        log.warning("%s stuck while %s (%s): leaving the group and rejoining with a fresh consumer", self.name, doing, reason)

    async def _watch(self, task: asyncio.Future[Any], consumer: Any = None) -> Verdict:
        stopped = asyncio.ensure_future(self.stop.wait())
        next_group_check = time.monotonic() + self.GROUP_CHECK_S
        try:
            while not task.done() and not self.stop.is_set():
                await asyncio.wait({task, stopped}, timeout=self.PERIOD_S)
                if task.done():
                    break
                in_group, lag, progress = self._state()
                now = time.monotonic()
                verdict = self.watchdog.observe(now, in_group=in_group, lag=lag, progress=progress)
                if verdict is not Verdict.OK:
                    return verdict
                if consumer is not None and self.topic is not None and in_group and now >= next_group_check:
                    next_group_check = now + self.GROUP_CHECK_S
                    unowned = await unowned_offsets(consumer, self.topic)
                    if self.watchdog.observe_group(time.monotonic(), unowned) is Verdict.REBALANCE:
                        self.rebalances += 1
                        log.warning("%s: %s; asking the group to rebalance", self.name, self.watchdog.last_reason)
                        consumer._coordinator.request_rejoin()  # noqa: SLF001
            return Verdict.OK
        finally:
            stopped.cancel()

    async def _finish(self, task: asyncio.Future[None], consumer: Consumer) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(task), self.stop_grace_s)
        except asyncio.TimeoutError:
            log.warning("%s did not stop within %.0f s; cancelling it", self.name, self.stop_grace_s)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        finally:
            await self._close(consumer)
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
