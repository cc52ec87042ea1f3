"""End to end: two gateway workers, the chat service, Redis and Tansu, as processes."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from tests.e2e.stack import Stack, start_stack
from tests.support import Client, scaled


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("stack"))
    yield s
    s.stop()


@pytest.fixture
async def redis_client(stack: Stack) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(stack.redis_url)
    yield client
    await client.aclose()


def room_name() -> str:
    return "e2e-" + uuid.uuid4().hex[:8]


async def numsub(redis_client: aioredis.Redis, room: str) -> int:
    return dict(await redis_client.pubsub_numsub(f"room:{room}"))[f"room:{room}".encode()]


async def eventually_numsub(redis_client: aioredis.Redis, room: str, expected: int) -> None:
    for _ in range(300):
        if await numsub(redis_client, room) == expected:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"NUMSUB room:{room} stayed {await numsub(redis_client, room)}, expected {expected}")


async def test_every_client_on_both_workers_gets_every_message_once_in_seq_order(
    stack: Stack, redis_client: aioredis.Redis
) -> None:
    room = room_name()
    counter = redis_client.pubsub()
    await counter.subscribe(f"room:{room}")
    clients = [await Client.connect(stack.ws_url(i % 2), f"user{i}") for i in range(6)]
    for c in clients:
        assert (await c.join(room))["seq"] == 0
    assert await numsub(redis_client, room) == 3  # two gateways + the counter
    per_client = 10
    for n in range(per_client):
        for i, c in enumerate(clients):
            await c.send({"type": "message.send", "room": room, "body": f"m{i}-{n}", "client_msg_id": f"c{i}-{n}"})
    total = per_client * len(clients)
    for c in clients:
        got = await c.collect(room, total, timeout=30)
        assert [m["seq"] for m in got] == list(range(1, total + 1))
    # Every post was acked once (acks may come between messages; collect kept the rest).
    # Each event was PUBLISHed exactly once: the counting subscriber saw each seq once.
    published: list[int] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + scaled(5)
    while len(published) < total and loop.time() < deadline:
        msg = await counter.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if msg is not None:
            published.append(json.loads(msg["data"])["seq"])
    await asyncio.sleep(0.5)
    while (msg := await counter.get_message(ignore_subscribe_messages=True, timeout=0.1)) is not None:
        published.append(json.loads(msg["data"])["seq"])
    assert sorted(published) == list(range(1, total + 1))
    bodies = {m["body"] for m in clients[0].messages[room]}
    assert bodies == {f"m{i}-{n}" for i in range(len(clients)) for n in range(per_client)}
    await counter.aclose()
    for c in clients:
        await c.close()


async def test_subscription_appears_on_first_join_and_vanishes_after_last_leave_or_disconnect(
    stack: Stack, redis_client: aioredis.Redis
) -> None:
    room = room_name()
    assert await numsub(redis_client, room) == 0
    a = await Client.connect(stack.ws_url(0), "a")
    await a.join(room)
    assert await numsub(redis_client, room) == 1
    b = await Client.connect(stack.ws_url(1), "b")
    await b.join(room)
    assert await numsub(redis_client, room) == 2
    await a.send({"type": "leave", "room": room})
    await a.expect("left")
    await eventually_numsub(redis_client, room, 1)
    await b.close()
    await eventually_numsub(redis_client, room, 0)
    await a.close()


async def test_repeated_client_msg_id_is_acked_twice_and_delivered_once(stack: Stack) -> None:
    room = room_name()
    sender = await Client.connect(stack.ws_url(0), "alice")
    watcher = await Client.connect(stack.ws_url(1), "bob")
    await sender.join(room)
    await watcher.join(room)
    post = {"type": "message.send", "room": room, "body": "once", "client_msg_id": "dup-1"}
    await sender.send(post)
    assert await sender.expect("ack", timeout=10) == {"type": "ack", "client_msg_id": "dup-1"}
    await sender.send(post)
    assert await sender.expect("ack", timeout=10) == {"type": "ack", "client_msg_id": "dup-1"}
    await sender.send({"type": "message.send", "room": room, "body": "after", "client_msg_id": "dup-2"})
    await sender.expect("ack", timeout=10)
    got = await watcher.collect(room, 2, timeout=15)
    assert [(m["seq"], m["body"]) for m in got] == [(1, "once"), (2, "after")]
    with pytest.raises(asyncio.TimeoutError):
        await watcher.recv(timeout=0.5)  # no third message
    db = sqlite3.connect(stack.data_dir / "chat.db")
    try:
        tables = [r[0] for r in db.execute("select name from sqlite_master where type='table'")]
        table = "messages" if "messages" in tables else tables[0]
        stored = db.execute(f"select count(*) from {table} where room = ?", (room,)).fetchone()[0]
    finally:
        db.close()
    assert stored == 2
    await sender.close()
    await watcher.close()


async def test_join_with_since_replays_then_continues_live_without_gap_or_duplicate(stack: Stack) -> None:
    room = room_name()
    poster = await Client.connect(stack.ws_url(0), "poster")
    await poster.join(room)
    for n in range(1, 6):
        await poster.send({"type": "message.send", "room": room, "body": f"m{n}", "client_msg_id": f"c{n}"})
    await poster.collect(room, 5, timeout=15)
    late = await Client.connect(stack.ws_url(1), "late")
    joined = await late.join(room, since=2)
    assert joined["seq"] == 5 and "recovered" not in joined
    await poster.send({"type": "message.send", "room": room, "body": "m6", "client_msg_id": "c6"})
    got = await late.collect(room, 4, timeout=15)
    assert [m["seq"] for m in got] == [3, 4, 5, 6]
    plain = await Client.connect(stack.ws_url(0), "plain")
    assert (await plain.join(room))["seq"] == 6
    for c in (poster, late, plain):
        await c.close()
