"""The Postgres message store (production), on an asyncpg pool.

Schema migrations run on start: `MIGRATIONS` is an ordered list of SQL
scripts, version i + 1 being MIGRATIONS[i]; `schema_migrations(version,
applied_at)` records what ran. Each pending migration runs in its own
transaction that first takes `pg_advisory_xact_lock(_MIGRATION_LOCK)`, so two
chat instances starting together apply each migration once (the second waits,
then sees it recorded and skips it), and a failing migration leaves nothing
half applied. Never edit a released migration; append a new one.

Seq safety (base.py): a batch is one READ COMMITTED transaction:

1. dedupe: look up every (room, user, client_msg_id) of the batch at once;
2. reserve seqs: `INSERT INTO rooms ... ON CONFLICT DO UPDATE SET latest_seq
   = latest_seq + n RETURNING latest_seq`, rooms in sorted order. The upsert
   row-locks each room until commit, so a second writer on the same room (two
   instances during a rebalance) waits, then continues from the committed
   latest_seq: no gap, no reuse. Sorted order keeps two writers from
   deadlocking;
3. insert the messages (one statement over arrays), then delete what the
   retention count drops.

UNIQUE(room, seq) and UNIQUE(room, user_id, client_msg_id) back this up. A
unique violation means another writer raced this batch (for the dedupe key:
it stored the same post between steps 1 and 3); the transaction is rolled
back, counted (`statistics()`), and the batch retried, when the dedupe lookup
finds the other writer's row. A deadlock or serialization failure is retried
the same way.

user_id, body and client_msg_id are bytea (UTF-8), not text: Postgres text
cannot hold NUL, which JSON and the gateway allow, and one such post would
otherwise fail its batch forever and stall its partition.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from chat.core.ids import UlidGenerator
from chat.storage.base import HISTORY_MAX_LIMIT, HistoryPage, Retention, StoreBase, StoredMessage, StoreError
from roomcast.wire.events import IngestRecord, MessageEvent

__all__ = ["MIGRATIONS", "PostgresStore"]

log = logging.getLogger("roomcast.chat.store")

_BIGINT_MAX = (1 << 63) - 1

# Version i + 1 is MIGRATIONS[i]. Append only: a released entry never changes.
MIGRATIONS: tuple[str, ...] = (
    # 1: rooms and messages (the column names sqlite.py uses; `user_id` because
    # USER is reserved here).
    """
    CREATE TABLE rooms (
        room text PRIMARY KEY,
        latest_seq bigint NOT NULL,
        oldest_seq bigint NOT NULL
    );
    CREATE TABLE messages (
        room text NOT NULL,
        seq bigint NOT NULL,
        id text NOT NULL,
        user_id bytea NOT NULL,
        body bytea NOT NULL,
        client_msg_id bytea NOT NULL,
        ts bigint NOT NULL,
        CONSTRAINT messages_pkey PRIMARY KEY (room, seq),
        CONSTRAINT messages_dedupe UNIQUE (room, user_id, client_msg_id)
    );
    -- The age sweep finds expired messages without scanning every room.
    CREATE INDEX messages_ts ON messages (ts);
    """,
)

# pg_advisory_xact_lock key for migrations: "roomcast" in ASCII.
_MIGRATION_LOCK = 0x726F6F6D63617374
_CREATE_MIGRATIONS_TABLE = """
    CREATE TABLE IF NOT EXISTS schema_migrations (
        version int PRIMARY KEY,
        applied_at timestamptz NOT NULL DEFAULT now()
    )
"""

_CONFLICT_ATTEMPTS = 5
_SWEEP_CHUNK_ROOMS = 500  # rooms pruned per transaction by enforce_retention

# LATERAL ... LIMIT 1 (at most one row anyway: UNIQUE) keeps this one index
# probe per key; as a plain join the planner hashes a seq scan of the whole
# table while it is small (2.4 ms instead of 0.3 ms at 10k messages).
_FIND_DUPLICATES = """
    SELECT k.i, m.id, m.seq, m.body, m.ts
    FROM unnest($1::text[], $2::bytea[], $3::bytea[]) WITH ORDINALITY AS k(room, user_id, client_msg_id, i)
    CROSS JOIN LATERAL (
        SELECT id, seq, body, ts FROM messages
        WHERE room = k.room AND user_id = k.user_id AND client_msg_id = k.client_msg_id
        LIMIT 1
    ) m
"""
# $3 is the retention count, or NULL for none: GREATEST ignores a NULL
# argument, so then oldest_seq stays as it was.
_RESERVE_SEQS = """
    INSERT INTO rooms AS r (room, latest_seq, oldest_seq)
    SELECT room, n, GREATEST(1, n - $3::bigint + 1)
    FROM unnest($1::text[], $2::bigint[]) AS t(room, n)
    ORDER BY room
    ON CONFLICT (room) DO UPDATE SET
        latest_seq = r.latest_seq + excluded.latest_seq,
        oldest_seq = GREATEST(r.oldest_seq, r.latest_seq + excluded.latest_seq - $3::bigint + 1)
    RETURNING room, latest_seq, oldest_seq
"""
_INSERT_MESSAGES = """
    INSERT INTO messages (room, seq, id, user_id, body, client_msg_id, ts)
    SELECT room, seq, id, user_id, body, client_msg_id, $7::bigint
    FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bytea[], $5::bytea[], $6::bytea[])
        AS t(room, seq, id, user_id, body, client_msg_id)
"""
# Per room an index range scan (OFFSET 0 keeps the subquery from being
# flattened into a join), then delete by ctid; the plain DELETE ... USING form
# hashes a seq scan of the whole table (3.4 ms instead of 0.8 ms at 10k
# messages). The caller holds the rooms' row locks, so the ctids are stable.
_DELETE_BEFORE = """
    DELETE FROM messages WHERE ctid = ANY(ARRAY(
        SELECT x.ctid FROM unnest($1::text[], $2::bigint[]) AS p(room, keep_from)
        CROSS JOIN LATERAL (SELECT ctid FROM messages WHERE room = p.room AND seq < p.keep_from OFFSET 0) x
    ))
"""
_LOCK_ROOMS = "SELECT room, latest_seq, oldest_seq FROM rooms WHERE room = ANY($1::text[]) ORDER BY room FOR UPDATE"
_SET_OLDEST = """
    UPDATE rooms r SET oldest_seq = p.keep_from
    FROM unnest($1::text[], $2::bigint[]) AS p(room, keep_from) WHERE r.room = p.room
"""
_EXPIRED = "SELECT room, max(seq) + 1 FROM messages WHERE ts < $1 GROUP BY room"
_OVER_COUNT = "SELECT room, latest_seq FROM rooms WHERE latest_seq - oldest_seq + 1 > $1"
# One statement, so latest_seq and the messages come from one snapshot.
_HISTORY = """
    SELECT r.latest_seq, r.oldest_seq, m.id, m.seq, m.user_id, m.body, m.client_msg_id, m.ts
    FROM rooms r LEFT JOIN LATERAL (
        SELECT id, seq, user_id, body, client_msg_id, ts FROM messages
        WHERE room = r.room AND seq > $2 ORDER BY seq LIMIT $3
    ) m ON true
    WHERE r.room = $1
    ORDER BY m.seq
"""
_ROOM_LATEST = "SELECT latest_seq FROM rooms WHERE room = $1"

# Failures worth a StoreError (the caller retries): the server or the network.
_DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)
# A lost race with another writer: roll back and run the batch again.
_RACES = (asyncpg.UniqueViolationError, asyncpg.DeadlockDetectedError, asyncpg.SerializationError)


@dataclass(frozen=True, slots=True)
class _Row:
    """A new message of the batch, before insert."""

    room: str
    seq: int
    id: str
    user: bytes
    body: bytes
    client_msg_id: bytes


class PostgresStore(StoreBase):
    """A MessageStore on a Postgres database (chat.storage.base documents the contract).

    `dsn` is a libpq URL (`postgresql://user:password@host:port/db`). The pool
    holds `min_size` to `max_size` connections; every statement times out after
    `command_timeout_s`; aclose() waits `close_timeout_s` for calls in flight,
    then terminates. `migrations` is for tests (the default is MIGRATIONS).
    Usable as `async with`.
    """

    def __init__(
        self,
        dsn: str,
        *,
        retention: Retention = Retention(),
        min_size: int = 1,
        max_size: int = 4,
        command_timeout_s: float = 30.0,
        close_timeout_s: float = 2.5,
        migrations: Sequence[str] = MIGRATIONS,
    ) -> None:
        self.dsn = dsn
        self.retention = retention
        self._min_size = min_size
        self._max_size = max_size
        self._command_timeout_s = command_timeout_s
        # Under the chat service's 3 s bound for closing the store, so a hung
        # call ends in terminate() here rather than in leaked connections.
        self._close_timeout_s = close_timeout_s
        self._migrations = tuple(migrations)
        self._where = _describe(dsn)  # for messages: never the password
        self._ids = UlidGenerator()  # used on the event loop only
        self._pool: asyncpg.Pool | None = None
        self._closed = False
        super().__init__()  # the counters

    # ---- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        """Open the pool and apply pending migrations. Raises StoreError."""
        if self._closed:
            raise StoreError("the store is closed; open a new one")
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self.dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                command_timeout=self._command_timeout_s,
                timeout=10.0,  # connect
            )
        except (*_DB_ERRORS, ValueError) as exc:  # ValueError: a malformed URL
            raise StoreError(f"cannot connect to Postgres at {self._where}: {type(exc).__name__}: {exc}") from exc
        try:
            await self._migrate(pool)
        except BaseException:
            await pool.close()
            raise
        if self._closed:  # aclose() ran while we were starting
            await pool.close()
            raise StoreError("the store was closed while starting")
        self._pool = pool

    async def aclose(self) -> None:
        """Close the pool, waiting up to close_timeout_s for calls in flight. Idempotent."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self._close_timeout_s)
        except (*_DB_ERRORS, TimeoutError) as exc:  # closing: nothing left to save
            log.warning("closing the Postgres pool failed (%s); terminating its connections", exc or type(exc).__name__)
            pool.terminate()

    async def _migrate(self, pool: asyncpg.Pool) -> None:
        try:
            async with pool.acquire() as con:
                async with con.transaction():
                    await con.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                    await con.execute(_CREATE_MIGRATIONS_TABLE)
                    applied = {r[0] for r in await con.fetch("SELECT version FROM schema_migrations")}
                newest_known = len(self._migrations)
                if applied and max(applied) > newest_known:
                    # A newer roomcast migrated this database (a rolling upgrade):
                    # migrations only add, so this version still works.
                    log.warning(
                        "database %s has schema version %d, newer than this roomcast's %d",
                        self._where, max(applied), newest_known,
                    )
                for version, script in enumerate(self._migrations, start=1):
                    if version in applied:
                        continue
                    async with con.transaction():
                        await con.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                        # Another instance may have applied it while we waited for the lock.
                        if await con.fetchval("SELECT 1 FROM schema_migrations WHERE version = $1", version):
                            continue
                        await con.execute(script)
                        await con.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
                    log.info("database %s: applied schema migration %d", self._where, version)
        except _DB_ERRORS as exc:
            raise StoreError(f"schema migration of {self._where} failed: {type(exc).__name__}: {exc}") from exc

    def _pool_or_raise(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("the store is closed" if self._closed else "the store is not started")
        return self._pool

    # ---- writes -----------------------------------------------------------

    async def store_batch(self, records: Sequence[IngestRecord], now_ms: int) -> list[StoredMessage]:
        """See MessageStore.store_batch. Raises StoreError; then nothing of the batch is stored."""
        if not records:
            return []
        records = list(records)
        for attempt in range(1, _CONFLICT_ATTEMPTS + 1):
            pool = self._pool_or_raise()
            try:
                async with pool.acquire() as con, con.transaction():
                    out, pruned = await self._store_batch(con, records, now_ms)
            except _RACES as exc:
                self._count_race(exc)
                if attempt == _CONFLICT_ATTEMPTS:
                    raise StoreError(f"batch lost {attempt} write races in a row: {type(exc).__name__}: {exc}") from exc
                log.warning("batch of %d records raced another writer (%s); retrying", len(records), exc)
                continue
            except _DB_ERRORS as exc:
                raise StoreError(f"Postgres {type(exc).__name__}: {exc}") from exc
            self._batches += 1
            created = sum(1 for s in out if s.created)
            self._stored += created
            self._duplicates += len(out) - created
            self._pruned += pruned
            return out
        raise AssertionError("unreachable")

    def _count_race(self, exc: Exception) -> None:
        if isinstance(exc, asyncpg.UniqueViolationError):
            if exc.constraint_name == "messages_pkey":
                self._seq_conflicts += 1
            else:
                self._dedupe_conflicts += 1

    async def _store_batch(
        self, con: asyncpg.Connection, records: list[IngestRecord], now_ms: int
    ) -> tuple[list[StoredMessage], int]:
        """The batch inside its transaction: (one StoredMessage per record, messages pruned)."""
        # 1. Dedupe against what is stored, and inside the batch.
        encoded = [(r.room, r.user.encode(), r.client_msg_id.encode()) for r in records]
        first_of: dict[tuple[str, bytes, bytes], int] = {}
        for i, key in enumerate(encoded):
            first_of.setdefault(key, i)
        unique = sorted(first_of.values())
        stored: dict[int, MessageEvent] = {}  # record index -> its already stored event
        for i, id_, seq, body, ts in await con.fetch(
            _FIND_DUPLICATES,
            [encoded[i][0] for i in unique],
            [encoded[i][1] for i in unique],
            [encoded[i][2] for i in unique],
        ):
            r = records[unique[i - 1]]  # WITH ORDINALITY counts from 1
            stored[unique[i - 1]] = MessageEvent(id_, r.room, seq, r.user, bytes(body).decode(), r.client_msg_id, ts)
        new = [i for i in unique if i not in stored]

        # 2. Reserve a run of seqs per room (row-locks each room until commit).
        pruned = 0
        rows: list[_Row] = []
        if new:
            counts = Counter(records[i].room for i in new)
            rooms = sorted(counts)
            reserved = await con.fetch(_RESERVE_SEQS, rooms, [counts[r] for r in rooms], self.retention.keep_messages)
            next_seq = {room: latest - counts[room] + 1 for room, latest, _ in reserved}
            keep_from = {room: oldest for room, _, oldest in reserved}
            for i in new:
                r = records[i]
                seq = next_seq[r.room]
                next_seq[r.room] = seq + 1
                event = MessageEvent(self._ids.new(now_ms), r.room, seq, r.user, r.body, r.client_msg_id, now_ms)
                stored[i] = event
                rows.append(_Row(r.room, seq, event.id, encoded[i][1], r.body.encode(), encoded[i][2]))

            # 3. Insert, skipping what the retention count drops at once, then
            #    delete what it drops of the older messages.
            kept = [row for row in rows if row.seq >= keep_from[row.room]]
            pruned = len(rows) - len(kept)
            if kept:
                await con.execute(
                    _INSERT_MESSAGES,
                    [row.room for row in kept],
                    [row.seq for row in kept],
                    [row.id for row in kept],
                    [row.user for row in kept],
                    [row.body for row in kept],
                    [row.client_msg_id for row in kept],
                    now_ms,
                )
            moved = [room for room in rooms if keep_from[room] > 1]
            if self.retention.keep_messages is not None and moved:
                status = await con.execute(_DELETE_BEFORE, moved, [keep_from[room] for room in moved])
                pruned += _row_count(status)

        fresh = set(new)
        out = []
        for i, key in enumerate(encoded):
            first = first_of[key]
            out.append(StoredMessage(stored[first], created=i == first and first in fresh))
        return out, pruned

    async def prune(self, room: str, *, keep_from_seq: int) -> int:
        """See MessageStore.prune. Raises StoreError."""
        return await self._prune_rooms({room: keep_from_seq})

    async def _prune_rooms(self, keep_from: dict[str, int]) -> int:
        """Prune each room below its keep_from seq, in one transaction; rooms locked in sorted order."""
        pool = self._pool_or_raise()
        rooms = sorted(keep_from)
        for attempt in range(1, _CONFLICT_ATTEMPTS + 1):
            try:
                async with pool.acquire() as con, con.transaction():
                    moved: dict[str, int] = {}
                    for room, latest, oldest in await con.fetch(_LOCK_ROOMS, rooms):
                        new_oldest = min(keep_from[room], latest + 1)
                        if new_oldest > oldest:
                            moved[room] = new_oldest
                    if not moved:
                        return 0
                    args = (list(moved), list(moved.values()))
                    status = await con.execute(_DELETE_BEFORE, *args)
                    await con.execute(_SET_OLDEST, *args)
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError) as exc:
                if attempt == _CONFLICT_ATTEMPTS:
                    raise StoreError(f"prune lost {attempt} races in a row: {exc}") from exc
                continue
            except _DB_ERRORS as exc:
                raise StoreError(f"Postgres {type(exc).__name__}: {exc}") from exc
            deleted = _row_count(status)
            self._pruned += deleted
            return deleted
        raise AssertionError("unreachable")

    async def enforce_retention(self, now_ms: int) -> int:
        """See MessageStore.enforce_retention. Raises StoreError."""
        pool = self._pool_or_raise()  # raises when closed, also without limits
        keep_ms, keep_messages = self.retention.keep_ms, self.retention.keep_messages
        if keep_ms is None and keep_messages is None:
            return 0
        keep_from: dict[str, int] = {}
        # Read without locks; _prune_rooms re-reads each room's bounds under its row lock.
        try:
            async with pool.acquire() as con:
                if keep_ms is not None:
                    for room, first_kept in await con.fetch(_EXPIRED, now_ms - keep_ms):
                        keep_from[room] = first_kept
                if keep_messages is not None:
                    for room, latest in await con.fetch(_OVER_COUNT, keep_messages):
                        keep_from[room] = max(keep_from.get(room, 1), self.retention.keep_from_seq(latest))
        except _DB_ERRORS as exc:
            raise StoreError(f"Postgres {type(exc).__name__}: {exc}") from exc
        rooms = sorted(keep_from)
        deleted = 0
        for i in range(0, len(rooms), _SWEEP_CHUNK_ROOMS):
            deleted += await self._prune_rooms({room: keep_from[room] for room in rooms[i : i + _SWEEP_CHUNK_ROOMS]})
        return deleted

    # ---- reads ------------------------------------------------------------

    async def history(self, room: str, after_seq: int = 0, limit: int = 100) -> HistoryPage:
        """See MessageStore.history. Raises ValueError for bad arguments, StoreError."""
        if after_seq < 0:
            raise ValueError(f"after_seq must be 0 or more, not {after_seq}")
        if not 1 <= limit <= HISTORY_MAX_LIMIT:
            raise ValueError(f"limit must be 1 to {HISTORY_MAX_LIMIT}, not {limit}")
        rows = await self._fetch(_HISTORY, room, min(after_seq, _BIGINT_MAX), limit)
        if not rows:
            return HistoryPage(room, 0, 1, [])
        messages = [
            MessageEvent(r[2], room, r[3], bytes(r[4]).decode(), bytes(r[5]).decode(), bytes(r[6]).decode(), r[7])
            for r in rows
            if r[3] is not None  # the LEFT JOIN's row for a room with no message after after_seq
        ]
        return HistoryPage(room, rows[0][0], rows[0][1], messages)

    async def latest_seq(self, room: str) -> int:
        """See MessageStore.latest_seq. Raises StoreError."""
        rows = await self._fetch(_ROOM_LATEST, room)
        return int(rows[0][0]) if rows else 0

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        pool = self._pool_or_raise()
        try:
            rows: list[asyncpg.Record] = await pool.fetch(query, *args)
        except _DB_ERRORS as exc:
            raise StoreError(f"Postgres {type(exc).__name__}: {exc}") from exc
        return rows


def _row_count(status: str) -> int:
    """The row count of a command status such as "DELETE 3"."""
    return int(status.rsplit(" ", 1)[1])


def _describe(dsn: str) -> str:
    """host:port/db of a URL, without user or password (for messages)."""
    try:
        parts = urlsplit(dsn)
        return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or '/'}"
    except ValueError:
        return "(malformed database_url)"
