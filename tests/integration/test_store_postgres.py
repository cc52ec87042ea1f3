"""What only the Postgres store has: schema migrations on start, and write-race accounting.

The behaviour every store shares is in test_store_conformance.py; these run
on the session's throwaway cluster (tests/integration/conftest.py), each on a
fresh database.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from chat.storage import StoreError, StoreStatistics
from chat.storage.postgres import MIGRATIONS, PostgresStore
from roomcast.wire.events import IngestRecord

NOW = 1_732_650_000_000


def rec(room: str, cmid: str) -> IngestRecord:
    return IngestRecord(room, "alice", f"body {cmid}", cmid, "gw-1", NOW)


@pytest.fixture
async def db(postgres_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A direct connection to the test database, to look under the store."""
    con = await asyncpg.connect(postgres_url)
    try:
        yield con
    finally:
        await con.close()


async def test_start_applies_every_migration_once_and_a_restart_applies_none(postgres_url: str, db: asyncpg.Connection) -> None:
    async with PostgresStore(postgres_url):
        pass
    rows = await db.fetch("SELECT version, applied_at FROM schema_migrations ORDER BY version")
    assert [r["version"] for r in rows] == list(range(1, len(MIGRATIONS) + 1))
    async with PostgresStore(postgres_url) as store:
        await store.store_batch([rec("r1", "c1")], NOW)
    assert await db.fetch("SELECT version, applied_at FROM schema_migrations ORDER BY version") == rows
    assert {r[0] for r in await db.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")} == {
        "schema_migrations", "rooms", "messages",
    }


async def test_instances_starting_together_migrate_once(postgres_url: str, db: asyncpg.Connection) -> None:
    # Without the advisory lock the losers fail on CREATE TABLE (or apply a migration twice).
    stores = [PostgresStore(postgres_url) for _ in range(4)]
    try:
        await asyncio.gather(*(s.start() for s in stores))
        outs = await asyncio.gather(*(s.store_batch([rec("r1", f"c{i}")], NOW) for i, s in enumerate(stores)))
    finally:
        for s in stores:
            await s.aclose()
    assert sorted(out[0].event.seq for out in outs) == [1, 2, 3, 4]
    assert await db.fetchval("SELECT count(*) FROM schema_migrations") == len(MIGRATIONS)


async def test_a_new_migration_is_applied_on_the_next_start_and_a_failing_one_leaves_nothing(
    postgres_url: str, db: asyncpg.Connection
) -> None:
    async with PostgresStore(postgres_url) as store:
        await store.store_batch([rec("r1", "c1")], NOW)
    broken = (*MIGRATIONS, "CREATE TABLE half_done (x int); SELECT no_such_column FROM rooms")
    with pytest.raises(StoreError, match="schema migration .* failed"):
        await PostgresStore(postgres_url, migrations=broken).start()
    assert await db.fetchval("SELECT to_regclass('half_done')") is None  # rolled back whole
    assert await db.fetchval("SELECT max(version) FROM schema_migrations") == len(MIGRATIONS)

    added = (*MIGRATIONS, "ALTER TABLE rooms ADD COLUMN note text")
    async with PostgresStore(postgres_url, migrations=added) as store:
        [s] = await store.store_batch([rec("r1", "c2")], NOW)
        assert s.event.seq == 2  # data kept across the migration
    assert await db.fetchval("SELECT max(version) FROM schema_migrations") == len(MIGRATIONS) + 1
    # An older roomcast on the newer schema still starts (rolling upgrade).
    async with PostgresStore(postgres_url) as store:
        assert await store.latest_seq("r1") == 2


async def test_a_seq_conflict_is_counted_retried_and_never_stored(postgres_url: str, db: asyncpg.Connection) -> None:
    async with PostgresStore(postgres_url) as store:
        await store.store_batch([rec("r1", f"c{i}") for i in range(3)], NOW)
        # A writer that bypassed the rooms row lock left latest_seq behind the
        # messages: the next seq collides with UNIQUE(room, seq).
        await db.execute("UPDATE rooms SET latest_seq = 1 WHERE room = 'r1'")
        with pytest.raises(StoreError, match="write races"):
            await store.store_batch([rec("r1", "c9"), rec("r2", "c1")], NOW)
        stats = store.statistics()
        assert stats.seq_conflicts == 5 and stats.dedupe_conflicts == 0 and stats.batches == 1
        assert await db.fetchval("SELECT count(*) FROM messages") == 3  # nothing of the failed batch
        assert await db.fetchval("SELECT count(*) FROM rooms WHERE room = 'r2'") == 0


async def test_a_dedupe_race_is_counted_and_retried_into_the_stored_event(
    postgres_url: str, db: asyncpg.Connection
) -> None:
    # Another instance stores the same post between this batch's dedupe
    # lookup and its insert: held here by locking the room row first.
    async with PostgresStore(postgres_url) as a, PostgresStore(postgres_url) as b:
        await a.store_batch([rec("r1", "c0")], NOW)
        blocker = await asyncpg.connect(postgres_url)
        try:
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("SELECT 1 FROM rooms WHERE room = 'r1' FOR UPDATE")
            first = asyncio.create_task(a.store_batch([rec("r1", "dup")], NOW))
            second = asyncio.create_task(b.store_batch([rec("r1", "dup")], NOW))
            await asyncio.sleep(0.3)  # both did their dedupe lookup and wait on the row lock
            await tx.rollback()
            outs = await asyncio.gather(first, second)
        finally:
            await blocker.close()
        [x], [y] = outs
        assert {x.created, y.created} == {True, False} and x.event == y.event
        assert a.statistics().dedupe_conflicts + b.statistics().dedupe_conflicts == 1
        assert await db.fetchval("SELECT count(*) FROM messages WHERE room = 'r1'") == 2


async def test_statistics_survive_aclose(postgres_url: str) -> None:
    store = PostgresStore(postgres_url)
    await store.start()
    await store.store_batch([rec("r1", "c1"), rec("r1", "c1")], NOW)
    await store.aclose()
    assert store.statistics() == StoreStatistics(batches=1, stored=1, duplicates=1)


async def test_a_missing_database_raises_store_error(postgres_url: str) -> None:
    store = PostgresStore(postgres_url + "_missing")
    with pytest.raises(StoreError, match="cannot connect to Postgres .*_missing"):
        await store.start()
    await store.aclose()


async def test_aclose_ends_a_stuck_call_instead_of_hanging(postgres_url: str) -> None:
    async with PostgresStore(postgres_url) as warm:
        await warm.store_batch([rec("r1", "c0")], NOW)
    store = PostgresStore(postgres_url, close_timeout_s=0.3)
    await store.start()
    blocker = await asyncpg.connect(postgres_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM rooms WHERE room = 'r1' FOR UPDATE")
        stuck = asyncio.create_task(store.store_batch([rec("r1", "c1")], NOW))
        await asyncio.sleep(0.2)  # waiting on the row lock
        started = time.monotonic()
        await store.aclose()
        assert time.monotonic() - started < 2
        with pytest.raises(StoreError):
            await stuck
        await tx.rollback()
    finally:
        await blocker.close()
