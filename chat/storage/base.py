"""The message store: the one interface every storage backend implements.

A backend (sqlite.py, postgres.py) must keep these guarantees, which the
shared conformance suite in tests/integration/test_store_conformance.py checks
over every backend:

- Per room, `seq` is 1, 2, 3 ... with no gap and no reuse (PROTOCOL.md 3),
  also when two chat instances briefly both handle a room during a consumer
  group rebalance. The store, not the caller, assigns seq: inside the batch's
  transaction it takes the room's last seq under a lock (SQLite: `BEGIN
  IMMEDIATE`; Postgres: `INSERT ... ON CONFLICT DO UPDATE ... RETURNING` on the
  rooms row, or `SELECT ... FOR UPDATE`), and the schema backs it with
  UNIQUE(room, seq) and UNIQUE(room, user, client_msg_id), so a lost race is an
  error and a retry, never a gap or a double. The store retries such a batch
  itself and counts it (`statistics().seq_conflicts`, `dedupe_conflicts`).
- A record whose (room, user, client_msg_id) is already stored is not stored
  again: the stored event comes back with `created=False` (also for a repeat
  inside one batch). The same client_msg_id from another user or room is a
  new message.
- One batch is one transaction: all of it is stored or none of it.
- The room's latest seq survives retention: pruning old messages never lets
  a seq be reused.

Retention: a store is opened with a `Retention` (how many messages and how
much time to keep per room). `store_batch` keeps each room it writes within
the message count in the same transaction (so a busy room never holds more
than the count, and no extra commit is paid); `enforce_retention(now_ms)`,
called periodically, drops what is older than the age limit and applies the
count to every room (for rooms idle since the limit was lowered). `prune` is
the mechanism under both. A room's retained messages are always the
contiguous range oldest_seq..latest_seq, so `HistoryPage.oldest_seq` tells a
reader exactly what is gone. Dedupe covers the retained messages only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

from roomcast.wire.events import IngestRecord, MessageEvent

__all__ = [
    "HISTORY_MAX_LIMIT",
    "HistoryPage",
    "MessageStore",
    "Retention",
    "StoreBase",
    "StoreError",
    "StoreStatistics",
    "StoredMessage",
]

HISTORY_MAX_LIMIT = 500  # PROTOCOL.md 5: limit 1-500

_S = TypeVar("_S", bound="StoreBase")


class StoreError(Exception):
    """The store could not do what was asked (database unreachable, locked, corrupt).

    The caller may retry: every store operation is idempotent or read-only.
    """


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """The outcome of one ingest record: its stored event, and whether this call stored it.

    `created` is False when the record repeated an already-stored
    (room, user, client_msg_id): `event` is then the original, unchanged.
    """

    event: MessageEvent
    created: bool


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """A slice of a room's history, read in one consistent snapshot.

    `messages` are in seq order, each with seq > the `after_seq` asked for.
    `latest_seq` is the room's last seq (0 for a room that never had a
    message). `oldest_seq` is the lowest seq still retained, or
    `latest_seq + 1` when none is (so 1 for an empty room): the messages after
    `after_seq` are all available exactly when `after_seq + 1 >= oldest_seq`.
    """

    room: str
    latest_seq: int
    oldest_seq: int
    messages: list[MessageEvent] = field(default_factory=list)

    def recovers(self, after_seq: int) -> bool:
        """True when every message with seq > after_seq is still retained."""
        return after_seq + 1 >= self.oldest_seq


@dataclass(frozen=True, slots=True)
class Retention:
    """How much history to keep per room; None means no limit on that axis.

    `keep_messages`: the newest this many messages of a room are kept.
    `keep_ms`: messages whose `ts` is older than `now_ms - keep_ms` go at the
    next `enforce_retention(now_ms)`. Raises ValueError for a value below 1.
    """

    keep_messages: int | None = None
    keep_ms: int | None = None

    def __post_init__(self) -> None:
        for name in ("keep_messages", "keep_ms"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"Retention.{name} must be 1 or more, or None for no limit; not {value}")

    def keep_from_seq(self, latest_seq: int) -> int:
        """The lowest seq the message count keeps in a room whose last seq is latest_seq (1 if no count limit)."""
        if self.keep_messages is None:
            return 1
        return max(1, latest_seq - self.keep_messages + 1)


@dataclass(frozen=True, slots=True)
class StoreStatistics:
    """A snapshot of a store's counters since it was opened (feeds /metrics and tests).

    `seq_conflicts`: batches that hit UNIQUE(room, seq), i.e. two writers
    assigned the same seq; the locking should make this 0, so any is a bug or
    a writer that bypasses it. `dedupe_conflicts`: batches that hit
    UNIQUE(room, user, client_msg_id) because another writer stored the same
    post between this batch's dedupe check and its insert (two instances
    during a rebalance). Both are retried by the store. `pruned`: messages
    deleted by retention or `prune`.
    """

    batches: int = 0
    stored: int = 0
    duplicates: int = 0
    pruned: int = 0
    seq_conflicts: int = 0
    dedupe_conflicts: int = 0


class StoreBase:
    """What every store backend shares: its counters, `statistics()` and
    `async with` over `start()`/`aclose()`. Counters are bumped by the
    backend (on its one writer: the event loop or its writer thread)."""

    def __init__(self) -> None:
        self._batches = self._stored = self._duplicates = self._pruned = 0
        self._seq_conflicts = self._dedupe_conflicts = 0

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            self._batches, self._stored, self._duplicates, self._pruned, self._seq_conflicts, self._dedupe_conflicts
        )

    async def start(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self: _S) -> _S:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


@runtime_checkable
class MessageStore(Protocol):
    """Durable per-room message history with seq assignment and dedupe.

    Lifecycle: `await start()` once before anything else, `await aclose()` at
    the end (idempotent). Every method may raise StoreError on a database
    failure; the caller retries the same call.
    """

    async def start(self) -> None:
        """Connect and create the schema if missing. Raises StoreError."""
        ...

    async def aclose(self) -> None:
        """Close connections. Idempotent; never raises for an already closed store."""
        ...

    async def store_batch(self, records: Sequence[IngestRecord], now_ms: int) -> list[StoredMessage]:
        """Store valid records in one transaction; one StoredMessage per record, in order.

        Records are assigned seqs in the order given (per room), with `ts =
        now_ms` and a fresh ULID id. A repeat of a stored (room, user,
        client_msg_id) gives back the stored event with created=False. The
        records must already have passed `chat.core.validation`. The rooms
        written are kept within the retention's message count in the same
        transaction. A write conflict with another writer (see StoreStatistics)
        is retried here a few times. Raises StoreError, and then nothing of the
        batch is stored.
        """
        ...

    async def history(self, room: str, after_seq: int = 0, limit: int = 100) -> HistoryPage:
        """Up to `limit` messages of `room` with seq > after_seq, oldest first.

        Raises ValueError for a negative after_seq or a limit outside
        1..HISTORY_MAX_LIMIT, StoreError on a database failure.
        """
        ...

    async def latest_seq(self, room: str) -> int:
        """The room's last seq; 0 when it never had a message."""
        ...

    async def prune(self, room: str, *, keep_from_seq: int) -> int:
        """Delete the room's messages with seq < keep_from_seq; return how many went.

        The room's latest seq is unchanged, so seqs are never reused; its
        oldest retained seq moves up to keep_from_seq (at most latest_seq + 1).
        """
        ...

    async def enforce_retention(self, now_ms: int) -> int:
        """Apply the store's Retention to every room; return how many messages went.

        Drops messages with ts < now_ms - keep_ms, together with every older
        seq of their room (so retained seqs stay contiguous even if writers'
        clocks disagree), and each room's messages beyond keep_messages. Call
        it periodically; a no-op returning 0 without limits. Raises StoreError.
        """
        ...

    def statistics(self) -> StoreStatistics:
        """The counters since start (never raises; also after aclose)."""
        ...
