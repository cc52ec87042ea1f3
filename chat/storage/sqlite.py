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
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from chat.core.ids import UlidGenerator
from chat.storage.base import HISTORY_MAX_LIMIT, HistoryPage, StoredMessage, StoreError
from roomcast.wire.events import IngestRecord, MessageEvent

__all__ = ["SqliteStore"]

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
)

_FIND_DUPLICATE = "SELECT id, seq, body, ts FROM messages WHERE room = ? AND user_id = ? AND client_msg_id = ?"
_ROOM_LATEST = "SELECT latest_seq FROM rooms WHERE room = ?"
_INSERT_MESSAGE = (
    "INSERT INTO messages (room, seq, id, user_id, body, client_msg_id, ts) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT_ROOM = (
    "INSERT INTO rooms (room, latest_seq, oldest_seq) VALUES (?, ?, 1) "
    "ON CONFLICT (room) DO UPDATE SET latest_seq = excluded.latest_seq"
)
_ROOM_BOUNDS = "SELECT latest_seq, oldest_seq FROM rooms WHERE room = ?"
_HISTORY = (
    "SELECT id, seq, user_id, body, client_msg_id, ts FROM messages "
    "WHERE room = ? AND seq > ? ORDER BY seq LIMIT ?"
)


class SqliteStore:
    """A MessageStore over one SQLite file (chat.storage.base documents the contract).

    `path` is a file path; its directory must exist. Usable as `async with`.
    Raises ValueError for an in-memory path.
    """

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_ms: int = 5000) -> None:
        if str(path) in ("", ":memory:") or str(path).startswith("file:"):
            # The reader and the writer are two connections: they must share one file.
            raise ValueError(f"SQLite store needs a file path, not {str(path)!r}")
        self.path = Path(path)
        self._busy_timeout_ms = busy_timeout_ms
        self._ids = UlidGenerator()  # used on the writer thread only
        self._writer_pool: ThreadPoolExecutor | None = None
        self._reader_pool: ThreadPoolExecutor | None = None
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._closed = False

    async def __aenter__(self) -> SqliteStore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

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
        return await self._on(self._writer_pool, self._store_batch, list(records), now_ms)

    def _store_batch(self, records: list[IngestRecord], now_ms: int) -> list[StoredMessage]:
        con = self._connection(self._writer)
        out: list[StoredMessage] = []
        latest: dict[str, int] = {}
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
                    row = con.execute(_ROOM_LATEST, (record.room,)).fetchone()
                    last = row[0] if row is not None else 0
                seq = last + 1
                latest[record.room] = seq
                event = MessageEvent(
                    self._ids.new(now_ms), record.room, seq, record.user, record.body, record.client_msg_id, now_ms
                )
                seen[key] = event
                rows.append((record.room, seq, event.id, record.user, record.body, record.client_msg_id, now_ms))
                out.append(StoredMessage(event, True))
            if rows:
                con.executemany(_INSERT_MESSAGE, rows)
                con.executemany(_UPSERT_ROOM, latest.items())
            con.execute("COMMIT")
        except BaseException:
            _rollback(con)
            raise
        return out

    async def prune(self, room: str, *, keep_from_seq: int) -> int:
        """See MessageStore.prune. Raises StoreError."""
        return await self._on(self._writer_pool, self._prune, room, keep_from_seq)

    def _prune(self, room: str, keep_from_seq: int) -> int:
        con = self._connection(self._writer)
        con.execute("BEGIN IMMEDIATE")
        try:
            row = con.execute(_ROOM_BOUNDS, (room,)).fetchone()
            deleted = 0
            if row is not None:
                latest, oldest = row
                new_oldest = min(keep_from_seq, latest + 1)
                if new_oldest > oldest:
                    deleted = con.execute("DELETE FROM messages WHERE room = ? AND seq < ?", (room, new_oldest)).rowcount
                    con.execute("UPDATE rooms SET oldest_seq = ? WHERE room = ?", (new_oldest, room))
            con.execute("COMMIT")
        except BaseException:
            _rollback(con)
            raise
        return deleted

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
