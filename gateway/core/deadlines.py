"""Things that end at a given time, kept in one heap: one timer serves every socket.

Entries are never removed early (a heap cannot do it cheaply): the owner
checks, when an entry falls due, whether it still holds, and `retain` drops
dead entries in one pass when they pile up.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["Deadlines"]

T = TypeVar("T")


class Deadlines(Generic[T]):
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._order = itertools.count()  # ties keep insertion order; items are never compared

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, at: float, item: T) -> None:
        heapq.heappush(self._heap, (at, next(self._order), item))

    def next_at(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> list[T]:
        """Remove and return the items whose time is `now` or earlier, earliest first."""
        heap = self._heap
        items = []
        while heap and heap[0][0] <= now:
            items.append(heapq.heappop(heap)[2])
        return items

    def retain(self, keep: Callable[[T], bool]) -> None:
        """Drop every entry whose item `keep` refuses."""
        self._heap = [entry for entry in self._heap if keep(entry[2])]
        heapq.heapify(self._heap)
