"""The SQLite message store (embedded: `roomcast dev`, tests, single-node installs).

Plain `sqlite3` on two dedicated threads, one writer and one reader, rather
than aiosqlite: a whole batch (dedupe lookups, seq assignment, inserts,
commit) is one hop to the writer thread instead of one hop per statement, and
history reads never queue behind a write. WAL mode lets the reader see a
consistent snapshot while the writer commits. `synchronous=FULL` because the
ingest offsets are committed to Kafka right after a batch is stored: a batch
lost to a power cut after that commit would be lost for good.

Seq safety (see base.py): every write transaction is `BEGIN IMMEDIATE`, which
takes SQLite's single write lock before reading the room's last seq, so two
processes sharing the file serialise; UNIQUE(room, seq) and UNIQUE(room,
user_id, client_msg_id) back it up.

Retention (see base.py): the message count is applied inside the batch's
transaction (no second fsync per batch), the age limit by enforce_retention.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from chat.core.ids import UlidGenerator
from chat.storage.base import HISTORY_MAX_LIMIT, HistoryPage, Retention, StoreBase, StoredMessage, StoreError
from roomcast.wire.events import IngestRecord, MessageEvent

__all__ = ["SqliteStore"]

log = logging.getLogger("roomcast.chat.store")

T = TypeVar("T")

_SQLITE_MAX_INT = (1 << 63) - 1

# `user_id`, not `user`: the Postgres schema will share these names, and USER
# is reserved there.
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS rooms (
        room TEXT PRIMARY KEY,
        latest_seq INTEGER NOT NULL,
        oldest_seq INTEGER NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS messages (
        room TEXT NOT NULL,
        seq INTEGER NOT NULL,
        id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        body TEXT NOT NULL,
        client_msg_id TEXT NOT NULL,
        ts INTEGER NOT NULL,
        PRIMARY KEY (room, seq)
    ) WITHOUT ROWID""",
    "CREATE UNIQUE INDEX IF NOT EXISTS messages_dedupe ON messages (room, user_id, client_msg_id)",
    # The age sweep finds expired messages without scanning every room.
    "CREATE INDEX IF NOT EXISTS messages_ts ON messages (ts)",
)
# A unique violation under BEGIN IMMEDIATE means a writer that bypassed the
# lock; retried a few times, then the batch fails (the pipeline retries it).
_CONFLICT_ATTEMPTS = 3
# Rooms pruned per write transaction by enforce_retention, so a large sweep
# never holds the write lock for long.
_SWEEP_CHUNK_ROOMS = 500

_FIND_DUPLICATE = "SELECT id, seq, body, ts FROM messages WHERE room = ? AND user_id = ? AND client_msg_id = ?"
_ROOM_LATEST = "SELECT latest_seq FROM rooms WHERE room = ?"
_INSERT_MESSAGE = (
    "INSERT INTO messages (room, seq, id, user_id, body, client_msg_id, ts) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT_ROOM = (
    "INSERT INTO rooms (room, latest_seq, oldest_seq) VALUES (?, ?, ?) "
    "ON CONFLICT (room) DO UPDATE SET latest_seq = excluded.latest_seq, oldest_seq = excluded.oldest_seq"
)
_DELETE_BEFORE = "DELETE FROM messages WHERE room = ? AND seq < ?"
_EXPIRED = "SELECT room, max(seq) + 1 FROM messages WHERE ts < ? GROUP BY room"
_OVER_COUNT = "SELECT room, latest_seq FROM rooms WHERE latest_seq - oldest_seq + 1 > ?"
_ROOM_BOUNDS = "SELECT latest_seq, oldest_seq FROM rooms WHERE room = ?"
_HISTORY = (
    "SELECT id, seq, user_id, body, client_msg_id, ts FROM messages "
    "WHERE room = ? AND seq > ? ORDER BY seq LIMIT ?"
)


class SqliteStore(StoreBase):
    """A MessageStore over one SQLite file (chat.storage.base documents the contract).

    `path` is a file path; its directory must exist. `retention` is applied by
    store_batch and enforce_retention. Usable as `async with`. Raises
    ValueError for an in-memory path.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, retention: Retention = Retention(), busy_timeout_ms: int = 5000
    ) -> None:
        if str(path) in ("", ":memory:") or str(path).startswith("file:"):
            # The reader and the writer are two connections: they must share one file.
            raise ValueError(f"SQLite store needs a file path, not {str(path)!r}")
        self.path = Path(path)
        self.retention = retention
        self._busy_timeout_ms = busy_timeout_ms
        self._ids = UlidGenerator()  # used on the writer thread only
        self._writer_pool: ThreadPoolExecutor | None = None
        self._reader_pool: ThreadPoolExecutor | None = None
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._closed = False
        super().__init__()  # the counters, written on the writer thread only

    # ---- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        """Open the file (creating it and the schema if missing). Raises StoreError."""
        if self._closed:
            raise StoreError("the store is closed; open a new one")
        if self._writer is not None:
            return
        self._writer_pool = ThreadPoolExecutor(1, thread_name_prefix="roomcast-sqlite-writer")
        self._reader_pool = ThreadPoolExecutor(1, thread_name_prefix="roomcast-sqlite-reader")
        try:
            self._writer = await self._on(self._writer_pool, self._open, True)
            self._reader = await self._on(self._reader_pool, self._open, False)
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Close both connections and threads. Idempotent; waits for calls in flight."""
        self._closed = True
        for pool, attr in ((self._writer_pool, "_writer"), (self._reader_pool, "_reader")):
            if pool is None:
                continue
            con: sqlite3.Connection | None = getattr(self, attr)
            setattr(self, attr, None)
            if con is not None:
                # On its own thread: queued after any call still running there.
                await asyncio.get_running_loop().run_in_executor(pool, con.close)
            pool.shutdown(wait=True)
        self._writer_pool = self._reader_pool = None

    def _open(self, writer: bool) -> sqlite3.Connection:
        try:
            # isolation_level=None: no implicit transactions; every one is explicit below.
            con = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite database {str(self.path)!r}: {exc}") from exc
        try:
            con.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            if writer:
                mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode != "wal":
                    raise StoreError(f"SQLite database {str(self.path)!r} cannot use WAL mode (got {mode!r})")
                con.execute("PRAGMA synchronous = FULL")
                con.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    con.execute(statement)
                con.execute("COMMIT")
        except sqlite3.Error as exc:
            con.close()
            raise StoreError(f"cannot prepare SQLite database {str(self.path)!r}: {exc}") from exc
        except BaseException:
            con.close()
            raise
        return con

    async def _on(self, pool: ThreadPoolExecutor | None, fn: Callable[..., T], *args: Any) -> T:
        if pool is None:
            raise StoreError("the store is not started" if not self._closed else "the store is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite {type(exc).__name__}: {exc}") from exc

    # ---- writes -----------------------------------------------------------

    async def store_batch(self, records: Sequence[IngestRecord], now_ms: int) -> list[StoredMessage]:
        """See MessageStore.store_batch. Raises StoreError; then nothing of the batch is stored."""
        if not records:
            return []
        return await self._on(self._writer_pool, self._store_batch_retrying, list(records), now_ms)

    def _store_batch_retrying(self, records: list[IngestRecord], now_ms: int) -> list[StoredMessage]:
        for attempt in range(1, _CONFLICT_ATTEMPTS + 1):
            try:
                out = self._store_batch(records, now_ms)
            except sqlite3.IntegrityError as exc:
                # "UNIQUE constraint failed: messages.room, messages.seq" (or the dedupe columns).
                if "messages.seq" in str(exc):
                    self._seq_conflicts += 1
                elif "messages.client_msg_id" in str(exc):
                    self._dedupe_conflicts += 1
                else:
                    raise
                if attempt == _CONFLICT_ATTEMPTS:
                    raise
                log.warning("batch of %d records hit a write conflict (%s); retrying", len(records), exc)
                continue
            self._batches += 1
            created = sum(1 for s in out if s.created)
            self._stored += created
            self._duplicates += len(out) - created
            return out
        raise AssertionError("unreachable")

    def _store_batch(self, records: list[IngestRecord], now_ms: int) -> list[StoredMessage]:
        con = self._connection(self._writer)
        out: list[StoredMessage] = []
        latest: dict[str, int] = {}
        oldest: dict[str, int] = {}
        seen: dict[tuple[str, str, str], MessageEvent] = {}
        rows: list[tuple[str, int, str, str, str, str, int]] = []
        con.execute("BEGIN IMMEDIATE")
        try:
            for record in records:
                key = (record.room, record.user, record.client_msg_id)
                event = seen.get(key)
                if event is not None:  # repeated inside this batch
                    out.append(StoredMessage(event, False))
                    continue
                found = con.execute(_FIND_DUPLICATE, key).fetchone()
                if found is not None:
                    event = MessageEvent(found[0], record.room, found[1], record.user, found[2], record.client_msg_id, found[3])
                    seen[key] = event
                    out.append(StoredMessage(event, False))
                    continue
                last = latest.get(record.room)
                if last is None:
                    row = con.execute(_ROOM_BOUNDS, (record.room,)).fetchone()
                    last, oldest[record.room] = row if row is not None else (0, 1)
                seq = last + 1
                latest[record.room] = seq
                event = MessageEvent(
                    self._ids.new(now_ms), record.room, seq, record.user, record.body, record.client_msg_id, now_ms
                )
                seen[key] = event
                rows.append((record.room, seq, event.id, record.user, record.body, record.client_msg_id, now_ms))
                out.append(StoredMessage(event, True))
            pruned = 0
            if rows:
                # The message count, applied in this transaction: rows it would
                # drop at once are not inserted at all.
                keep_from = {room: max(oldest[room], self.retention.keep_from_seq(last)) for room, last in latest.items()}
                kept = [row for row in rows if row[1] >= keep_from[row[0]]]
                pruned = len(rows) - len(kept)
                con.executemany(_INSERT_MESSAGE, kept)
                for room, first_kept in keep_from.items():
                    if first_kept > oldest[room]:
                        pruned += con.execute(_DELETE_BEFORE, (room, first_kept)).rowcount
                con.executemany(_UPSERT_ROOM, [(room, last, keep_from[room]) for room, last in latest.items()])
            con.execute("COMMIT")
        except BaseException:
            _rollback(con)
            raise
        self._pruned += pruned
        return out

    async def prune(self, room: str, *, keep_from_seq: int) -> int:
        """See MessageStore.prune. Raises StoreError."""
        return await self._on(self._writer_pool, self._prune, room, keep_from_seq)

    def _prune(self, room: str, keep_from_seq: int) -> int:
        return self._prune_rooms({room: keep_from_seq})

    def _prune_rooms(self, keep_from: dict[str, int]) -> int:
        """Prune each room below its keep_from seq, in one write transaction."""
        con = self._connection(self._writer)
        deleted = 0
        con.execute("BEGIN IMMEDIATE")
        try:
            for room, keep_from_seq in keep_from.items():
                row = con.execute(_ROOM_BOUNDS, (room,)).fetchone()
                if row is None:
                    continue
                latest, oldest = row
                new_oldest = min(keep_from_seq, latest + 1)
                if new_oldest > oldest:
                    deleted += con.execute(_DELETE_BEFORE, (room, new_oldest)).rowcount
                    con.execute("UPDATE rooms SET oldest_seq = ? WHERE room = ?", (new_oldest, room))
            con.execute("COMMIT")
        except BaseException:
            _rollback(con)
            raise
        self._pruned += deleted
        return deleted

    async def enforce_retention(self, now_ms: int) -> int:
        """See MessageStore.enforce_retention. Raises StoreError."""
        self._connection(self._writer)  # raises when closed, also without limits
        if self.retention.keep_ms is None and self.retention.keep_messages is None:
            return 0
        return await self._on(self._writer_pool, self._enforce_retention, now_ms)

    def _enforce_retention(self, now_ms: int) -> int:
        con = self._connection(self._writer)
        keep_from: dict[str, int] = {}
        # Read outside the write lock; _prune_rooms re-reads each room's bounds under it.
        if self.retention.keep_ms is not None:
            for room, first_kept in con.execute(_EXPIRED, (now_ms - self.retention.keep_ms,)):
                keep_from[room] = first_kept
        if self.retention.keep_messages is not None:
            for room, latest in con.execute(_OVER_COUNT, (self.retention.keep_messages,)):
                keep_from[room] = max(keep_from.get(room, 1), self.retention.keep_from_seq(latest))
        rooms = sorted(keep_from)
        return sum(
            self._prune_rooms({room: keep_from[room] for room in rooms[i : i + _SWEEP_CHUNK_ROOMS]})
            for i in range(0, len(rooms), _SWEEP_CHUNK_ROOMS)
        )

    # ---- reads ------------------------------------------------------------

    async def history(self, room: str, after_seq: int = 0, limit: int = 100) -> HistoryPage:
        """See MessageStore.history. Raises ValueError for bad arguments, StoreError."""
        if after_seq < 0:
            raise ValueError(f"after_seq must be 0 or more, not {after_seq}")
        if not 1 <= limit <= HISTORY_MAX_LIMIT:
            raise ValueError(f"limit must be 1 to {HISTORY_MAX_LIMIT}, not {limit}")
        return await self._on(self._reader_pool, self._history, room, min(after_seq, _SQLITE_MAX_INT), limit)

    def _history(self, room: str, after_seq: int, limit: int) -> HistoryPage:
        con = self._connection(self._reader)
        # One read transaction: latest_seq and the messages come from the same snapshot.
        con.execute("BEGIN")
        try:
            row = con.execute(_ROOM_BOUNDS, (room,)).fetchone()
            if row is None:
                return HistoryPage(room, 0, 1, [])
            latest, oldest = row
            messages = [
                MessageEvent(r[0], room, r[1], r[2], r[3], r[4], r[5])
                for r in con.execute(_HISTORY, (room, after_seq, limit))
            ]
        finally:
            con.execute("COMMIT")
        return HistoryPage(room, latest, oldest, messages)

    async def latest_seq(self, room: str) -> int:
        """See MessageStore.latest_seq. Raises StoreError."""
        return await self._on(self._reader_pool, self._latest_seq, room)

    def _latest_seq(self, room: str) -> int:
        row = self._connection(self._reader).execute(_ROOM_LATEST, (room,)).fetchone()
        return int(row[0]) if row is not None else 0

    def _connection(self, con: sqlite3.Connection | None) -> sqlite3.Connection:
        if con is None:
            raise StoreError("the store is closed")
        return con


def _rollback(con: sqlite3.Connection) -> None:
    if con.in_transaction:
        try:
            con.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # the original error is the one worth raising
