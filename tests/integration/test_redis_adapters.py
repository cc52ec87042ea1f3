"""The gateway's Redis adapters against a real redis-server: the subscriber (redis_sub) and the publisher (redis_pub)."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from gateway.adapters.redis_pub import RedisPublisher
from gateway.adapters.redis_sub import RedisSubscriber
from roomcast.wire.control import REVOKED_HASH
from tests.support import scaled


class Inbox:
    """What the subscriber hands over: every batch, and every (re)connection."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bytes]] = []
        self.connections: list[bool] = []
        self.arrived = asyncio.Event()

    def on_messages(self, batch: dict[bytes, list[bytes]]) -> None:
        self.messages.extend((channel, payload) for channel, payloads in batch.items() for payload in payloads)
        self.arrived.set()

    def on_connected(self, reconnected: bool) -> None:
        self.connections.append(reconnected)

    async def wait_for(self, count: int) -> list[tuple[bytes, bytes]]:
        deadline = asyncio.get_running_loop().time() + scaled(5)
        while len(self.messages) < count:
            assert asyncio.get_running_loop().time() < deadline, f"got {len(self.messages)} of {count}: {self.messages}"
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), 0.1)
            except asyncio.TimeoutError:
                pass
        return self.messages


async def test_subscribe_confirms_then_delivers_in_order_and_unsubscribe_stops_it(redis_url: str, redis_client: aioredis.Redis) -> None:
    inbox = Inbox()
    sub = RedisSubscriber(redis_url, inbox.on_messages, inbox.on_connected)
    await sub.start()
    try:
        assert await sub.wait_connected(scaled(5))
        await asyncio.wait_for(sub.subscribe(b"room:a"), scaled(5))
        assert sub.is_confirmed(b"room:a") and not sub.is_confirmed(b"room:b")
        for n in range(50):
            await redis_client.publish("room:a", f"m{n}")
        got = await inbox.wait_for(50)
        assert got == [(b"room:a", f"m{n}".encode()) for n in range(50)]
        sub.unsubscribe(b"room:a")
        for _ in range(100):
            if (await redis_client.pubsub_numsub("room:a"))[0][1] == 0:
                break
            await asyncio.sleep(0.01)
        assert await redis_client.publish("room:a", "late") == 0
        assert inbox.connections == [False]
    finally:
        await sub.aclose()


async def test_a_cut_connection_reconnects_resubscribes_and_says_it_reconnected(redis_url: str, redis_client: aioredis.Redis) -> None:
    inbox = Inbox()
    sub = RedisSubscriber(redis_url, inbox.on_messages, inbox.on_connected, reconnect_min_s=0.01)
    await sub.start()
    try:
        await asyncio.wait_for(sub.subscribe(b"room:r"), scaled(5))
        await redis_client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        deadline = asyncio.get_running_loop().time() + scaled(5)
        while not (sub.reconnects == 1 and sub.is_confirmed(b"room:r")):
            assert asyncio.get_running_loop().time() < deadline, "no reconnect"
            await asyncio.sleep(0.01)
        assert inbox.connections == [False, True]  # the hub checks every room against history on True
        await redis_client.publish("room:r", "after")
        assert await inbox.wait_for(1) == [(b"room:r", b"after")]
    finally:
        await sub.aclose()


async def test_publisher_publishes_on_room_channels_in_order_and_reads_revocations(redis_url: str, redis_client: aioredis.Redis) -> None:
    pubsub = redis_client.pubsub()
    await pubsub.subscribe("room:x", "room:y")
    publisher = RedisPublisher(redis_url, cluster=False)
    try:
        await publisher.publish_events([(b"x", b"1"), (b"y", b"2"), (b"x", b"3")])
        got = []
        while len(got) < 3:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=scaled(2))
            if message is not None:
                got.append((message["channel"], message["data"]))
        assert got == [(b"room:x", b"1"), (b"room:y", b"2"), (b"room:x", b"3")]
        await redis_client.hset(REVOKED_HASH, "mallory", "1732650000.5")
        assert await publisher.revocations() == {b"mallory": b"1732650000.5"}
    finally:
        await redis_client.delete(REVOKED_HASH)
        await pubsub.aclose()
        await publisher.aclose()
