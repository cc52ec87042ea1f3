"""Hand a consumer only contiguous offsets: a hole in a partition is waited out.

Why: the embedded broker (Tansu 0.6, memory storage) can make a record
visible to fetches before an earlier record of the same partition, when two
producers write to that partition at once. aiokafka then moves its position
past the earlier record, which is never fetched again: an acked post was
skipped by the chat service (the fault suite caught it; measured on Tansu:
1-3 of 9,000 records skipped with three concurrent producers and a live
consumer, every one of them present when re-read later).

Our topics are neither compacted nor transactional, so on real Kafka their
offsets are contiguous and this guard never holds anything back. It still
gives up on a hole after `patience_s` (a compacted topic or an aborted
transaction leaves holes that never fill), logging it, so it cannot stall
a partition for good.

Pure logic, no I/O: the adapter calls `admit` for each fetched partition,
processes the slice it gets, and seeks to `refetch_from` when it is set.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Admission", "OffsetGapGuard"]

log = logging.getLogger("roomcast.offsets")


@dataclass(frozen=True, slots=True)
class Admission:
    """What to do with one fetched partition's records.

    Process `records[skip:keep]`; when `refetch_from` is not None, seek the
    partition there (the records after the hole are fetched again once it has
    filled).
    """

    skip: int
    keep: int
    refetch_from: int | None


class OffsetGapGuard:
    """Per partition, the next offset expected; holds back records past a hole."""

    def __init__(self, patience_s: float = 2.0) -> None:
        self.patience_s = patience_s
        self._next: dict[Hashable, int] = {}
        # The hole each partition is waiting on: (its first offset, first seen at).
        self._waiting: dict[Hashable, tuple[int, float]] = {}
        self.holes_waited = 0  # refetches because of a hole
        self.holes_skipped = 0  # holes given up on after patience_s

    def knows(self, partition: Hashable) -> bool:
        return partition in self._next

    def expect(self, partition: Hashable, offset: int | None) -> None:
        """The next offset this partition's fetches will start at (after an assignment or a seek).

        None: unknown (no committed offset yet): the first record fetched is
        taken as the start.
        """
        self._waiting.pop(partition, None)
        if offset is None:
            self._next.pop(partition, None)
        else:
            self._next[partition] = offset

    def forget(self, partitions: Iterable[Hashable]) -> None:
        """Drop what is known of these partitions (revoked: the next owner reads them)."""
        for partition in partitions:
            self._next.pop(partition, None)
            self._waiting.pop(partition, None)

    def admit(self, partition: Hashable, offsets: Sequence[int], now_s: float) -> Admission:
        """Which of these fetched records (by offset, ascending) may be processed now."""
        if not offsets:
            return Admission(0, 0, None)
        expected = self._next.get(partition)
        skip = 0
        if expected is None:
            expected = offsets[0]
        while skip < len(offsets) and offsets[skip] < expected:
            skip += 1  # already processed (fetched again after a seek)
        keep = skip
        while keep < len(offsets):
            offset = offsets[keep]
            if offset > expected:
                waiting = self._waiting.get(partition)
                if waiting is None or waiting[0] != expected:
                    self._waiting[partition] = (expected, now_s)
                    waiting = self._waiting[partition]
                if now_s - waiting[1] < self.patience_s:
                    self.holes_waited += 1
                    self._next[partition] = expected
                    return Admission(skip, keep, expected)
                log.warning(
                    "partition %s: offsets %d..%d did not appear within %.1f s; going on without them",
                    partition, expected, offset - 1, self.patience_s,
                )
                self.holes_skipped += 1
                del self._waiting[partition]
            expected = offset + 1
            keep += 1
        self._next[partition] = expected
        if keep > skip:
            self._waiting.pop(partition, None)
        return Admission(skip, keep, None)
