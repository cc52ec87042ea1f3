"""The gateway on a local 3-node Redis Cluster with sharded pub/sub."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from redis.crc import key_slot

from roomcast.embedded import ManagedProcess, start_redis_cluster
from roomcast.kafka import ensure_topics
from roomcast.wire.control import CONTROL_CHANNEL
from roomcast.wire.events import CREATED_TOPIC
from tests.integration.gateway_harness import base_config, start_gateway, ws_url
from tests.support import Client, close_code, event, revoke


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ManagedProcess]]:
    nodes = start_redis_cluster(3, work_dir=tmp_path_factory.mktemp("cluster"))
    yield nodes
    for node in nodes:
        node.stop()


def rooms_on_every_node(nodes: list[ManagedProcess], per_node: int = 2) -> list[str]:
    """Room ids whose channels hash to slots of each of the three nodes."""
    rooms: list[str] = []
    counts = [0, 0, 0]
    i = 0
    while min(counts) < per_node:
        room = f"c{i}"
        node = min(key_slot(f"room:{room}".encode()) // (16384 // 3), 2)
        if counts[node] < per_node:
            counts[node] += 1
            rooms.append(room)
        i += 1
    return rooms


async def slot_owners(nodes: list[ManagedProcess]) -> Callable[[int], str]:
    """slot -> the address of the node that owns it, as the cluster itself says (CLUSTER SLOTS)."""
    r = aioredis.Redis.from_url(f"redis://{nodes[0].address}")
    try:
        ranges = [(int(start), int(end), f"{host.decode()}:{port}") for start, end, (host, port, *_), *_ in await r.execute_command("CLUSTER SLOTS")]
    finally:
        await r.aclose()

    def owner(slot: int) -> str:
        return next(address for start, end, address in ranges if start <= slot <= end)

    return owner


async def test_relay_spublishes_and_every_socket_gets_its_rooms_on_a_3_node_cluster(
    cluster: list[ManagedProcess], kafka_bootstrap: str
) -> None:
    url = f"redis://{cluster[0].address}"
    await ensure_topics(kafka_bootstrap, partitions=2)
    app = await start_gateway(base_config(url, redis_mode="cluster", kafka_bootstrap=kafka_bootstrap))
    rooms = rooms_on_every_node(cluster)
    try:
        assert len(app.subscriber.nodes) == 3  # one connection per node, not per channel
        clients = {room: [await Client.connect(ws_url(app), f"u{i}") for i in range(2)] for room in rooms}
        for room, cs in clients.items():
            for c in cs:
                await c.join(room)
        # Each node holds exactly the shard channels whose slots it owns.
        owner = await slot_owners(cluster)
        for node in cluster:
            r = aioredis.Redis.from_url(f"redis://{node.address}")
            channels = {c.decode() for c in await r.execute_command("PUBSUB SHARDCHANNELS")}
            await r.aclose()
            expected = {f"room:{room}" for room in rooms if owner(key_slot(f"room:{room}".encode())) == node.address}
            assert expected, f"no room hashes to {node.address}: the test would prove nothing for it"
            if owner(key_slot(CONTROL_CHANNEL.encode())) == node.address:
                expected.add(CONTROL_CHANNEL)  # every gateway hears revocations (gateway/access.py)
            assert channels == expected, f"node {node.address}: shard channels {sorted(channels)}, slots it owns say {sorted(expected)}"
        for _ in range(200):
            if app.ready:
                break
            await asyncio.sleep(0.05)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        await producer.start()
        try:
            for seq in range(1, 11):
                for room in rooms:
                    await producer.send(CREATED_TOPIC, event(room, seq), key=room.encode())
            await producer.flush()
        finally:
            await producer.stop()
        for room, cs in clients.items():
            for c in cs:
                got = await c.collect(room, 10, timeout=20)
                assert [m["seq"] for m in got] == list(range(1, 11))
        # `roomcast revoke` reaches the gateway through the cluster (SPUBLISH).
        out = await revoke(url, "u0", "--redis-mode", "cluster")
        assert "1 gateway worker(s) told" in out
        revoked = [c for cs in clients.values() for c in cs[:1]]  # each room's first client is u0
        assert await asyncio.gather(*(close_code(c) for c in revoked)) == [4002] * len(revoked)
        for cs in clients.values():
            for c in cs[1:]:
                await c.close()
    finally:
        await app.drain()


async def test_last_leave_sunsubscribes_on_the_owning_node(cluster: list[ManagedProcess]) -> None:
    app = await start_gateway(base_config(f"redis://{cluster[0].address}", redis_mode="cluster"))
    try:
        c = await Client.connect(ws_url(app), "u")
        await c.join("solo")
        channel = b"room:solo"
        owner = app.subscriber.routes[channel]
        r = aioredis.Redis(host=owner[0], port=owner[1])
        assert dict(await r.execute_command("PUBSUB SHARDNUMSUB", channel))[channel] == 1
        await c.close()
        for _ in range(200):
            if dict(await r.execute_command("PUBSUB SHARDNUMSUB", channel))[channel] == 0:
                break
            await asyncio.sleep(0.01)
        assert dict(await r.execute_command("PUBSUB SHARDNUMSUB", channel))[channel] == 0
        await r.aclose()
    finally:
        await app.drain()
