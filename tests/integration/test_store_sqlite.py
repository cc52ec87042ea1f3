"""The message store conformance suite (chat.storage.base), over every backend.

Each test takes the `store` fixture, parametrized over the backends; the
Postgres store joins by adding a param to `STORE_FACTORIES` (and a fixture
that starts a throwaway cluster). Nothing here may depend on SQLite.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from chat.core.ids import is_ulid, ulid_time_ms
from chat.storage import HistoryPage, MessageStore, StoredMessage, StoreError, open_store
from chat.storage.sqlite import SqliteStore
from roomcast.wire.events import IngestRecord

NOW = 1_732_650_000_000

StoreFactory = Callable[[Path], Awaitable[MessageStore]]


async def _sqlite(tmp_path: Path) -> MessageStore:
    return open_store(f"sqlite:///{tmp_path / 'chat.db'}")


STORE_FACTORIES: dict[str, StoreFactory] = {"sqlite": _sqlite}


@pytest.fixture(params=sorted(STORE_FACTORIES))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MessageStore]:
    s = await STORE_FACTORIES[request.param](tmp_path)
    await s.start()
    try:
        yield s
    finally:
        await s.aclose()


def rec(room: str, n: int | str, user: str = "alice", body: str | None = None) -> IngestRecord:
    cmid = n if isinstance(n, str) else f"c-{n}"
    return IngestRecord(room, user, body if body is not None else f"body {cmid}", cmid, "gw-1", NOW - 5)


# ---- seq ---------------------------------------------------------------------


async def test_seq_starts_at_1_and_grows_by_1_within_a_batch(store: MessageStore) -> None:
    out = await store.store_batch([rec("r1", i) for i in range(5)], NOW)
    assert [s.event.seq for s in out] == [1, 2, 3, 4, 5]
    assert all(s.created for s in out)


async def test_seq_is_gap_free_per_room_across_batches_and_rooms(store: MessageStore) -> None:
    seqs: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    n = 0
    for batch_no in range(6):
        batch = []
        for i in range(batch_no + 1):
            room = "abc"[(batch_no + i) % 3]
            batch.append(rec(room, n))
            n += 1
        for s in await store.store_batch(batch, NOW + batch_no):
            seqs[s.event.room].append(s.event.seq)
    for room, got in seqs.items():
        assert got == list(range(1, len(got) + 1)), room
        assert await store.latest_seq(room) == len(got)


async def test_batch_results_are_one_per_record_in_order(store: MessageStore) -> None:
    batch = [rec("r1", 1), rec("r2", 1), rec("r1", 2), rec("r1", 1)]
    out = await store.store_batch(batch, NOW)
    assert len(out) == 4
    assert [(s.event.room, s.event.client_msg_id) for s in out] == [(r.room, r.client_msg_id) for r in batch]
    assert [s.created for s in out] == [True, True, True, False]


async def test_event_fields_come_from_the_record_and_the_store(store: MessageStore) -> None:
    [s] = await store.store_batch([IngestRecord("room.1", "bob", "hé ✓", "cm-9", "gw-2", NOW - 100)], NOW)
    e = s.event
    assert (e.room, e.user, e.body, e.client_msg_id, e.seq, e.ts) == ("room.1", "bob", "hé ✓", "cm-9", 1, NOW)
    assert is_ulid(e.id) and ulid_time_ms(e.id) == NOW


async def test_ids_are_unique_and_follow_seq_order(store: MessageStore) -> None:
    events = [s.event for s in await store.store_batch([rec("r1", i) for i in range(20)], NOW)]
    events += [s.event for s in await store.store_batch([rec("r1", i) for i in range(20, 40)], NOW)]
    ids = [e.id for e in events]
    assert len(set(ids)) == 40
    assert ids == sorted(ids)


async def test_an_empty_batch_stores_nothing(store: MessageStore) -> None:
    assert await store.store_batch([], NOW) == []
    assert await store.latest_seq("r1") == 0


async def test_concurrent_batches_on_one_room_never_reuse_or_skip_a_seq(store: MessageStore) -> None:
    batches = [[rec("hot", f"{b}-{i}") for i in range(10)] for b in range(8)]
    results = await asyncio.gather(*(store.store_batch(b, NOW) for b in batches))
    seqs = sorted(s.event.seq for out in results for s in out)
    assert seqs == list(range(1, 81))


# ---- dedupe ------------------------------------------------------------------


async def test_repeated_client_msg_id_returns_the_original_event_not_created(store: MessageStore) -> None:
    [first] = await store.store_batch([rec("r1", 1, body="original")], NOW)
    await store.store_batch([rec("r1", 2)], NOW + 1)
    [again] = await store.store_batch([rec("r1", 1, body="a retry with other text")], NOW + 50)
    assert again == StoredMessage(first.event, created=False)
    assert again.event.body == "original" and again.event.ts == NOW
    assert await store.latest_seq("r1") == 2


async def test_repeat_inside_one_batch_is_stored_once(store: MessageStore) -> None:
    out = await store.store_batch([rec("r1", 1), rec("r1", 1), rec("r1", 2), rec("r1", 1)], NOW)
    assert [s.created for s in out] == [True, False, True, False]
    assert out[1].event == out[0].event == out[3].event
    assert out[2].event.seq == 2
    page = await store.history("r1")
    assert [m.seq for m in page.messages] == [1, 2]


async def test_same_client_msg_id_from_another_user_is_a_new_message(store: MessageStore) -> None:
    a, b = await store.store_batch([rec("r1", "same", user="alice"), rec("r1", "same", user="bob")], NOW)
    assert a.created and b.created
    assert (a.event.seq, b.event.seq) == (1, 2)


async def test_same_client_msg_id_in_another_room_is_a_new_message(store: MessageStore) -> None:
    a, b = await store.store_batch([rec("r1", "same"), rec("r2", "same")], NOW)
    assert a.created and b.created
    assert (a.event.seq, b.event.seq) == (1, 1)


async def test_replaying_a_whole_batch_stores_nothing_and_returns_the_same_events(store: MessageStore) -> None:
    batch = [rec(f"r{i % 3}", i) for i in range(30)]
    first = await store.store_batch(batch, NOW)
    again = await store.store_batch(batch, NOW + 1000)
    assert [s.event for s in again] == [s.event for s in first]
    assert not any(s.created for s in again)
    assert [await store.latest_seq(f"r{i}") for i in range(3)] == [10, 10, 10]


# ---- history -------------------------------------------------------------------


async def test_history_of_an_empty_room(store: MessageStore) -> None:
    page = await store.history("nobody-here")
    assert page == HistoryPage("nobody-here", 0, 1, [])
    assert await store.latest_seq("nobody-here") == 0
    assert page.recovers(0)


async def test_history_returns_messages_after_seq_in_order_with_latest_seq(store: MessageStore) -> None:
    stored = [s.event for s in await store.store_batch([rec("r1", i) for i in range(10)], NOW)]
    await store.store_batch([rec("other", i) for i in range(3)], NOW)
    page = await store.history("r1", after_seq=4, limit=3)
    assert page.room == "r1" and page.latest_seq == 10 and page.oldest_seq == 1
    assert page.messages == stored[4:7]
    assert [m.seq for m in (await store.history("r1", after_seq=0, limit=500)).messages] == list(range(1, 11))
    assert (await store.history("r1", after_seq=10)).messages == []
    assert (await store.history("r1", after_seq=99)).messages == []
    assert (await store.history("r1", after_seq=9)).messages == [stored[9]]


async def test_history_defaults_are_after_0_and_limit_100(store: MessageStore) -> None:
    await store.store_batch([rec("r1", i) for i in range(150)], NOW)
    page = await store.history("r1")
    assert [m.seq for m in page.messages] == list(range(1, 101))
    assert page.latest_seq == 150


@pytest.mark.parametrize(("after", "limit"), [(-1, 10), (0, 0), (0, 501), (0, -3)])
async def test_history_refuses_bad_arguments(store: MessageStore, after: int, limit: int) -> None:
    with pytest.raises(ValueError):
        await store.history("r1", after, limit)


async def test_history_with_a_huge_after_is_empty_not_an_error(store: MessageStore) -> None:
    await store.store_batch([rec("r1", 1)], NOW)
    page = await store.history("r1", after_seq=10**30)
    assert page.messages == [] and page.latest_seq == 1


async def test_history_is_a_consistent_snapshot_under_writes(store: MessageStore) -> None:
    async def writer() -> None:
        for b in range(30):
            await store.store_batch([rec("r1", f"{b}-{i}") for i in range(5)], NOW)

    async def reader() -> None:
        for _ in range(60):
            page = await store.history("r1", 0, 500)
            seqs = [m.seq for m in page.messages]
            assert seqs == list(range(1, page.latest_seq + 1))
            await asyncio.sleep(0)

    await asyncio.gather(writer(), reader())


# ---- retention -----------------------------------------------------------------


async def test_prune_keeps_latest_seq_and_reports_the_oldest_retained(store: MessageStore) -> None:
    await store.store_batch([rec("r1", i) for i in range(10)], NOW)
    assert await store.prune("r1", keep_from_seq=7) == 6
    page = await store.history("r1")
    assert [m.seq for m in page.messages] == [7, 8, 9, 10]
    assert (page.latest_seq, page.oldest_seq) == (10, 7)
    assert page.recovers(6) and not page.recovers(5)
    assert await store.prune("r1", keep_from_seq=3) == 0  # never moves back
    [s] = await store.store_batch([rec("r1", "after-prune")], NOW)
    assert s.event.seq == 11


async def test_pruning_everything_never_reuses_a_seq(store: MessageStore) -> None:
    await store.store_batch([rec("r1", i) for i in range(3)], NOW)
    assert await store.prune("r1", keep_from_seq=1000) == 3
    page = await store.history("r1")
    assert (page.latest_seq, page.oldest_seq, page.messages) == (3, 4, [])
    [s] = await store.store_batch([rec("r1", "next")], NOW)
    assert s.event.seq == 4
    assert await store.prune("nowhere", keep_from_seq=5) == 0


# ---- lifecycle and durability ---------------------------------------------------


async def test_aclose_is_idempotent_and_a_closed_store_refuses_calls(tmp_path: Path) -> None:
    s = open_store(f"sqlite:///{tmp_path / 'x.db'}")
    await s.start()
    await s.aclose()
    await s.aclose()
    with pytest.raises(StoreError):
        await s.latest_seq("r1")


async def test_data_survives_reopening(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    s = open_store(url)
    await s.start()
    first = await s.store_batch([rec("r1", i) for i in range(3)], NOW)
    await s.aclose()
    s = open_store(url)
    await s.start()
    try:
        assert await s.latest_seq("r1") == 3
        [dup, new] = await s.store_batch([rec("r1", 0), rec("r1", 99)], NOW)
        assert dup == StoredMessage(first[0].event, False)
        assert new.event.seq == 4
    finally:
        await s.aclose()


async def test_two_stores_on_one_file_share_one_seq_sequence(tmp_path: Path) -> None:
    # Two chat instances on one database during a rebalance: seq stays gap-free.
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a, b = open_store(url), open_store(url)
    await a.start()
    await b.start()
    try:
        outs = await asyncio.gather(
            *(s.store_batch([rec("r1", f"{name}{k}-{i}") for i in range(5)], NOW) for k in range(6) for name, s in (("a", a), ("b", b)))
        )
        assert sorted(x.event.seq for out in outs for x in out) == list(range(1, 61))
        # The same record through either instance is one message.
        [x] = await a.store_batch([rec("r1", "both")], NOW)
        [y] = await b.store_batch([rec("r1", "both")], NOW)
        assert x.created and not y.created and y.event == x.event
    finally:
        await a.aclose()
        await b.aclose()


# ---- open_store --------------------------------------------------------------------


def test_open_store_picks_sqlite_by_url(tmp_path: Path) -> None:
    s = open_store(f"sqlite:///{tmp_path / 'a.db'}")
    assert isinstance(s, SqliteStore) and isinstance(s, MessageStore)
    assert s.path == tmp_path / "a.db"
    assert open_store("sqlite:///relative.db").path == Path("relative.db")  # type: ignore[attr-defined]


@pytest.mark.parametrize("url", ["postgresql://u@localhost/db", "postgres://u@localhost/db"])
def test_open_store_says_postgres_is_not_there_yet(url: str) -> None:
    with pytest.raises(NotImplementedError, match="not written yet"):
        open_store(url)


@pytest.mark.parametrize("url", ["mysql://x", "sqlite:///", "sqlite:///:memory:"])
def test_open_store_refuses_other_urls(url: str) -> None:
    with pytest.raises(ValueError):
        open_store(url)


async def test_unopenable_database_raises_store_error(tmp_path: Path) -> None:
    s = open_store(f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}")
    with pytest.raises(StoreError, match="cannot open"):
        await s.start()
    await s.aclose()


# ---- speed (a figure, not a benchmark) -----------------------------------------------


async def test_a_batch_of_100_is_stored_quickly(store: MessageStore) -> None:
    times = []
    for b in range(10):
        batch = [rec(f"r{i % 10}", f"{b}-{i}", body="x" * 100) for i in range(100)]
        t = time.perf_counter()
        await store.store_batch(batch, NOW)
        times.append(time.perf_counter() - t)
    # Generous bound: catches a per-record transaction or fsync (~100x slower), not noise.
    assert sorted(times)[5] < 0.1, times
