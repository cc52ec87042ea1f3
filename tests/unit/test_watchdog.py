"""The consumer watchdog (roomcast.watchdog) and the member loop that acts on it (roomcast.kafka.membership.WatchedMember)."""

from __future__ import annotations

import asyncio

import pytest

from roomcast.kafka.membership import ConsumerStalled, WatchedMember
from roomcast.watchdog import ConsumerWatchdog, Verdict, stall_bound_s


def test_the_bound_is_derived_from_the_session_and_rebalance_timeouts() -> None:
    assert stall_bound_s(6000, 6000) == pytest.approx(13.2)
    assert stall_bound_s(10_000, 60_000) == pytest.approx(72.0)


def test_an_idle_member_in_its_group_is_never_stalled() -> None:
    dog = ConsumerWatchdog(stall_after_s=5)
    for t in range(100):
        assert dog.observe(float(t), in_group=True, lag=0, progress=0) is Verdict.OK
    assert dog.stalled_for(100.0) == 0.0


def test_a_member_that_keeps_fetching_is_not_stalled_whatever_its_lag() -> None:
    dog = ConsumerWatchdog(stall_after_s=5)
    for t in range(100):
        assert dog.observe(float(t), in_group=True, lag=1000, progress=t) is Verdict.OK


def test_no_progress_with_records_waiting_rejoins_after_the_bound() -> None:
    dog = ConsumerWatchdog(stall_after_s=5)
    assert dog.observe(0.0, in_group=True, lag=3, progress=7) is Verdict.OK  # first sight counts as progress
    assert dog.observe(1.0, in_group=True, lag=3, progress=7) is Verdict.OK
    assert dog.observe(5.9, in_group=True, lag=3, progress=7) is Verdict.OK
    assert dog.stalled_for(5.9) == pytest.approx(4.9)
    assert dog.observe(6.1, in_group=True, lag=3, progress=7) is Verdict.REJOIN
    assert "no progress with 3 records waiting" in dog.last_reason
    assert dog.actions == 1


def test_out_of_the_group_rejoins_after_the_bound_even_with_nothing_waiting() -> None:
    dog = ConsumerWatchdog(stall_after_s=5)
    assert dog.observe(0.0, in_group=False, lag=0, progress=0) is Verdict.OK
    assert dog.observe(5.1, in_group=False, lag=0, progress=0) is Verdict.REJOIN
    assert "no assignment" in dog.last_reason


def test_two_rejoins_that_do_not_help_give_exit_and_recovery_resets_the_count() -> None:
    dog = ConsumerWatchdog(stall_after_s=5, max_rejoins=2)
    t = 0.0
    dog.observe(t, in_group=False, lag=0, progress=0)
    for expected in (Verdict.REJOIN, Verdict.REJOIN, Verdict.EXIT):
        t += 5.5
        assert dog.observe(t, in_group=False, lag=0, progress=0) is expected
        if expected is Verdict.REJOIN:
            dog.rejoined(t)  # a fresh consumer gets a whole bound
            assert dog.observe(t + 4.0, in_group=False, lag=0, progress=0) is Verdict.OK
    # A healthy observation ends the stall and the count.
    assert dog.observe(t + 1, in_group=True, lag=0, progress=0) is Verdict.OK
    assert dog.rejoins_in_a_row == 0
    assert dog.stalled_for(t + 1) == 0.0


class _FakeConsumer:
    def __init__(self, n: int) -> None:
        self.n = n
        self.closed = False


async def test_watched_member_rejoins_a_stuck_loop_then_gives_up() -> None:
    """A loop that hangs while records wait: two fresh consumers, then ConsumerStalled."""
    stop = asyncio.Event()
    opened: list[_FakeConsumer] = []

    async def connect() -> _FakeConsumer:
        opened.append(_FakeConsumer(len(opened)))
        return opened[-1]

    async def consume(consumer: _FakeConsumer) -> None:
        await asyncio.Event().wait()  # stuck for good

    async def close(consumer: _FakeConsumer) -> None:
        consumer.closed = True

    member = WatchedMember(
        "test", ConsumerWatchdog(stall_after_s=0.2), connect=connect, consume=consume, close=close,
        state=lambda: (True, 5, 0), stop=stop,
    )
    member.PERIOD_S = 0.02
    with pytest.raises(ConsumerStalled, match="no progress with 5 records waiting"):
        await asyncio.wait_for(member.run(), 5)
    assert len(opened) == 3 and all(c.closed for c in opened)
    assert member.rejoins == 2


async def test_watched_member_stops_cleanly_and_lets_the_loop_finish() -> None:
    stop = asyncio.Event()
    finished: list[str] = []

    async def connect() -> _FakeConsumer:
        return _FakeConsumer(0)

    async def consume(consumer: _FakeConsumer) -> None:
        await stop.wait()
        await asyncio.sleep(0.05)  # the in-flight batch
        finished.append("batch")

    async def close(consumer: _FakeConsumer) -> None:
        finished.append("closed")

    member = WatchedMember(
        "test", ConsumerWatchdog(stall_after_s=10), connect=connect, consume=consume, close=close,
        state=lambda: (True, 0, 0), stop=stop,
    )
    runner = asyncio.create_task(member.run())
    await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(runner, 5)
    assert finished == ["batch", "closed"]


def test_another_members_partition_with_records_waiting_and_no_commit_asks_for_a_rebalance() -> None:
    dog = ConsumerWatchdog(stall_after_s=13, orphan_after_s=6)
    # Partition 1 has records waiting and its commit stands still; partition 2 keeps committing.
    assert dog.observe_group(0.0, {1: (100, 120), 2: (50, 60)}) is Verdict.OK
    assert dog.observe_group(5.0, {1: (100, 125), 2: (55, 65)}) is Verdict.OK
    assert dog.observe_group(6.5, {1: (100, 130), 2: (60, 70)}) is Verdict.REBALANCE
    assert "no commit for 6.5 s" in dog.last_reason
    # At most once a bound, and it never counts towards an exit.
    assert dog.observe_group(7.0, {1: (100, 130)}) is Verdict.OK
    assert dog.rejoins_in_a_row == 0


def test_an_idle_or_moving_partition_of_another_member_is_not_orphaned() -> None:
    dog = ConsumerWatchdog(stall_after_s=13, orphan_after_s=6)
    for t in range(0, 30, 2):
        assert dog.observe_group(float(t), {1: (100, 100), 2: (t, t + 5), 3: (None, 0)}) is Verdict.OK
