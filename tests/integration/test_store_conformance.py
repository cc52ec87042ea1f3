"""The message store conformance suite (chat.storage.base), over every backend.

Each test takes `store_url` (a fresh database of one backend: a SQLite file
in tmp_path, or a new database on the session's throwaway Postgres cluster,
tests/integration/conftest.py) or `store`, a started store on it. Tests that
need a second instance on the same database (two chat instances during a
rebalance) open one with `open_started`. Nothing here may depend on one
backend, except the `open_store` section at the end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from chat.core.ids import is_ulid, ulid_time_ms
from chat.storage import HistoryPage, MessageStore, Retention, StoredMessage, StoreError, StoreStatistics, open_store
from chat.storage.postgres import PostgresStore
from chat.storage.sqlite import SqliteStore
from roomcast.wire.events import IngestRecord

NOW = 1_732_650_000_000
BACKENDS = ("sqlite", "postgres")

OpenStarted = Callable[..., Awaitable[MessageStore]]


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each backend."""
    if request.param == "postgres":
        # Requested only here, so SQLite runs on a machine without Postgres.
        return str(request.getfixturevalue("postgres_url"))
    return f"sqlite:///{tmp_path / 'chat.db'}"


@pytest.fixture
async def open_started(store_url: str) -> AsyncIterator[OpenStarted]:
    """Opens and starts stores on `store_url` (or another URL); closes them all at the end."""
    opened: list[MessageStore] = []

    async def open_(url: str = store_url, retention: Retention = Retention()) -> MessageStore:
        s = open_store(url, retention=retention)
        opened.append(s)
        await s.start()
        return s

    try:
        yield open_
    finally:
        for s in opened:
            await s.aclose()


@pytest.fixture
async def store(open_started: OpenStarted) -> MessageStore:
    return await open_started()


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


async def test_retention_count_is_kept_by_every_batch(open_started: OpenStarted) -> None:
    store = await open_started(retention=Retention(keep_messages=3))
    await store.store_batch([rec("r1", i) for i in range(2)], NOW)
    assert (await store.history("r1")).oldest_seq == 1  # under the count: nothing goes
    await store.store_batch([rec("r1", i) for i in range(2, 5)] + [rec("r2", 0)], NOW)
    page = await store.history("r1")
    assert [m.seq for m in page.messages] == [3, 4, 5]
    assert (page.latest_seq, page.oldest_seq) == (5, 3)
    assert [m.seq for m in (await store.history("r2")).messages] == [1]  # other rooms keep theirs
    # A batch larger than the count: only its last 3 are kept, seqs still run on.
    out = await store.store_batch([rec("r1", f"big-{i}") for i in range(10)], NOW)
    assert [s.event.seq for s in out] == list(range(6, 16)) and all(s.created for s in out)
    page = await store.history("r1")
    assert [m.client_msg_id for m in page.messages] == ["big-7", "big-8", "big-9"]
    assert (page.latest_seq, page.oldest_seq) == (15, 13)
    assert not page.recovers(11) and page.recovers(12)
    assert store.statistics().pruned == 2 + 10
    assert await store.enforce_retention(NOW) == 0  # nothing over the count is left for the sweep


async def test_retention_age_drops_older_messages_when_enforced(open_started: OpenStarted) -> None:
    store = await open_started(retention=Retention(keep_ms=60_000))
    await store.store_batch([rec("r1", i) for i in range(3)] + [rec("r2", 0)], NOW)
    await store.store_batch([rec("r1", i) for i in range(3, 5)], NOW + 30_000)
    assert await store.enforce_retention(NOW + 60_000) == 0  # exactly keep_ms old: kept
    assert await store.enforce_retention(NOW + 60_001) == 4
    page = await store.history("r1")
    assert [m.seq for m in page.messages] == [4, 5] and (page.latest_seq, page.oldest_seq) == (5, 4)
    page = await store.history("r2")
    assert (page.messages, page.latest_seq, page.oldest_seq) == ([], 1, 2)
    assert await store.enforce_retention(NOW + 90_001) == 2
    assert (await store.history("r1")).oldest_seq == 6
    [s] = await store.store_batch([rec("r1", "later")], NOW + 90_002)
    assert s.event.seq == 6  # never reused
    assert store.statistics().pruned == 6


async def test_retention_age_keeps_the_retained_seqs_contiguous_when_clocks_disagree(open_started: OpenStarted) -> None:
    # Two instances with skewed clocks: seq 2 got an older ts than seq 1. The
    # sweep drops everything up to the last expired seq, never a hole.
    store = await open_started(retention=Retention(keep_ms=1000))
    await store.store_batch([rec("r1", 1)], NOW)
    await store.store_batch([rec("r1", 2)], NOW - 5000)
    await store.store_batch([rec("r1", 3)], NOW)
    assert await store.enforce_retention(NOW + 500) == 2
    page = await store.history("r1")
    assert [m.seq for m in page.messages] == [3] and page.oldest_seq == 3


async def test_retention_count_is_applied_by_the_sweep_to_rooms_stored_under_a_larger_one(
    store_url: str, open_started: OpenStarted
) -> None:
    # The count was lowered at a restart: rooms idle since are trimmed by the sweep.
    old = await open_started()
    await old.store_batch([rec("r1", i) for i in range(10)] + [rec("r2", i) for i in range(2)], NOW)
    await old.aclose()
    store = await open_started(store_url, Retention(keep_messages=4))
    assert await store.enforce_retention(NOW) == 6
    page = await store.history("r1")
    assert [m.seq for m in page.messages] == [7, 8, 9, 10] and page.oldest_seq == 7
    assert [m.seq for m in (await store.history("r2")).messages] == [1, 2]


async def test_without_retention_nothing_is_ever_dropped(store: MessageStore) -> None:
    await store.store_batch([rec("r1", i) for i in range(20)], NOW)
    assert await store.enforce_retention(NOW + 10**12) == 0
    assert [m.seq for m in (await store.history("r1", 0, 500)).messages] == list(range(1, 21))


def test_retention_refuses_limits_below_1() -> None:
    for bad in ({"keep_messages": 0}, {"keep_ms": -1}):
        with pytest.raises(ValueError, match="1 or more"):
            Retention(**bad)  # type: ignore[arg-type]


# ---- statistics and odd text ------------------------------------------------------


async def test_statistics_count_batches_stored_and_duplicates(store: MessageStore) -> None:
    assert store.statistics() == StoreStatistics()
    await store.store_batch([rec("r1", 1), rec("r1", 2), rec("r1", 1)], NOW)
    await store.store_batch([rec("r1", 2), rec("r2", 1)], NOW)
    await store.store_batch([], NOW)
    assert store.statistics() == StoreStatistics(batches=2, stored=3, duplicates=2)


async def test_text_with_nul_and_any_unicode_round_trips_and_dedupes(store: MessageStore) -> None:
    # JSON and the gateway allow NUL; Postgres text does not, so a backend
    # must still store it faithfully (else one post stalls its partition).
    odd = IngestRecord("r1", "u\x00ser ✓", "nul \x00 here, emoji 🎉, rtl \u202e, 𝄞", "c\x00m", "gw", NOW)
    [first] = await store.store_batch([odd], NOW)
    [again] = await store.store_batch([odd], NOW)
    assert first.created and not again.created and again.event == first.event
    [m] = (await store.history("r1")).messages
    assert (m.user, m.body, m.client_msg_id) == (odd.user, odd.body, odd.client_msg_id)
    [other] = await store.store_batch([IngestRecord("r1", "u", "x", "c", "gw", NOW)], NOW)
    assert other.created and other.event.seq == 2  # NUL is not a terminator: "c\x00m" is not "c"


# ---- lifecycle and durability ---------------------------------------------------


async def test_aclose_is_idempotent_and_a_closed_store_refuses_calls(store_url: str) -> None:
    s = open_store(store_url)
    await s.start()
    await s.aclose()
    await s.aclose()
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: s.latest_seq("r1"),
        lambda: s.history("r1"),
        lambda: s.store_batch([rec("r1", 1)], NOW),
        lambda: s.prune("r1", keep_from_seq=2),
        lambda: s.enforce_retention(NOW),
    ]
    for call in calls:
        with pytest.raises(StoreError):
            await call()
    with pytest.raises(StoreError, match="closed"):
        await s.start()
    assert s.statistics() == StoreStatistics()


async def test_data_survives_reopening(store_url: str) -> None:
    url = store_url
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


async def test_two_instances_storing_into_one_room_at_once_share_one_gap_free_seq_sequence(
    open_started: OpenStarted,
) -> None:
    # Two chat instances on one database during a rebalance: seq stays gap-free.
    a, b = await open_started(), await open_started()
    outs = await asyncio.gather(
        *(s.store_batch([rec("r1", f"{name}{k}-{i}") for i in range(5)], NOW) for k in range(6) for name, s in (("a", a), ("b", b)))
    )
    assert sorted(x.event.seq for out in outs for x in out) == list(range(1, 61))
    page = await a.history("r1", 0, 500)
    assert [m.seq for m in page.messages] == list(range(1, 61)) and page.latest_seq == 60
    assert {m.seq: m for m in page.messages} == {x.event.seq: x.event for out in outs for x in out}
    # The same record through either instance is one message.
    [x] = await a.store_batch([rec("r1", "both")], NOW)
    [y] = await b.store_batch([rec("r1", "both")], NOW)
    assert x.created and not y.created and y.event == x.event
    assert a.statistics().seq_conflicts == b.statistics().seq_conflicts == 0


async def test_the_same_posts_through_two_instances_at_once_are_stored_once(open_started: OpenStarted) -> None:
    # A rebalance hands a partition over mid-batch: both instances store
    # overlapping batches at the same moment. Each post is stored once, every
    # result is the stored event, and seqs stay gap-free.
    a, b = await open_started(), await open_started()
    batches = [[rec(f"r{i % 2}", f"p{(k * 3 + i) % 40}") for i in range(8)] for k in range(12)]
    outs = await asyncio.gather(*(store.store_batch(batch, NOW) for batch in batches for store in (a, b)))
    stored = {}
    for room in ("r0", "r1"):
        page = await a.history(room, 0, 500)
        assert [m.seq for m in page.messages] == list(range(1, page.latest_seq + 1))
        for m in page.messages:
            assert (room, m.client_msg_id) not in stored, f"{m.client_msg_id} stored twice in {room}"
            stored[room, m.client_msg_id] = m
    for out in outs:
        for s in out:
            assert stored[s.event.room, s.event.client_msg_id] == s.event
    assert sum(s.created for out in outs for s in out) == len(stored)
    assert a.statistics().seq_conflicts == b.statistics().seq_conflicts == 0


# ---- open_store --------------------------------------------------------------------


def test_open_store_picks_sqlite_by_url(tmp_path: Path) -> None:
    s = open_store(f"sqlite:///{tmp_path / 'a.db'}", retention=Retention(keep_messages=5))
    assert isinstance(s, SqliteStore) and isinstance(s, MessageStore)
    assert s.path == tmp_path / "a.db"
    assert s.retention == Retention(keep_messages=5)
    assert open_store("sqlite:///relative.db").path == Path("relative.db")  # type: ignore[attr-defined]


@pytest.mark.parametrize("url", ["postgresql://u@localhost/db", "postgres://u:pw@db.example:5433/chat"])
def test_open_store_picks_postgres_by_url(url: str) -> None:
    s = open_store(url, retention=Retention(keep_ms=1000))
    assert isinstance(s, PostgresStore) and isinstance(s, MessageStore)
    assert s.dsn == url and s.retention == Retention(keep_ms=1000)


@pytest.mark.parametrize("url", ["mysql://x", "sqlite:///", "sqlite:///:memory:", "postgresql:/nohost"])
def test_open_store_refuses_other_urls(url: str) -> None:
    with pytest.raises(ValueError):
        open_store(url)


async def test_unopenable_sqlite_database_raises_store_error(tmp_path: Path) -> None:
    s = open_store(f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}")
    with pytest.raises(StoreError, match="cannot open"):
        await s.start()
    await s.aclose()


async def test_unreachable_postgres_raises_store_error_without_the_password() -> None:
    from roomcast.embedded import free_port

    s = open_store(f"postgresql://roomcast:s3cret@127.0.0.1:{free_port()}/chat")
    with pytest.raises(StoreError, match="cannot connect to Postgres at 127.0.0.1") as info:
        await s.start()
    assert "s3cret" not in str(info.value)
    await s.aclose()


# ---- speed (a figure, not a benchmark) -----------------------------------------------


async def test_a_batch_of_100_is_stored_quickly(store: MessageStore) -> None:
    times = []
    for b in range(10):
        batch = [rec(f"r{i % 10}", f"{b}-{i}", body="x" * 100) for i in range(100)]
        t = time.perf_counter()
        await store.store_batch(batch, NOW)
        times.append(time.perf_counter() - t)
    logging.getLogger("test").info("store_batch(100) median %.2f ms", sorted(times)[5] * 1000)
    # Generous bound: catches a per-record transaction or fsync (~100x slower), not noise.
    assert sorted(times)[5] < 0.1, times
