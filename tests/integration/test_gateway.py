"""The gateway against a real redis-server and a real Tansu broker, in-process."""

from __future__ import annotations

import asyncio
import re
import json
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
import websockets
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from gateway.adapters.kafka import CreatedRelay
from gateway.worker import GatewayWorker
from roomcast.embedded import free_port
from roomcast.kafka import ensure_topics
from roomcast.wire.events import CREATED_TOPIC, INGEST_TOPIC, decode_ingest
from tests.integration.gateway_harness import base_config, start_gateway, ws_url
from tests.support import Client, event, scaled


@pytest.fixture
async def gateway(redis_url: str) -> AsyncIterator[GatewayWorker]:
    app = await start_gateway(base_config(redis_url))
    yield app
    await app.drain()


def label_names(metrics_text: str) -> set[str]:
    """The name of every label of every sample in a Prometheus text exposition."""
    names: set[str] = set()
    for line in metrics_text.splitlines():
        if line.startswith("#") or "{" not in line:
            continue
        labels = line[line.index("{") + 1 : line.rindex("}")]
        names.update(re.findall(r'([A-Za-z_][A-Za-z0-9_]*)="(?:[^"\\]|\\.)*"', labels))
    return names


async def numsub(redis_client: aioredis.Redis, room: str) -> int:
    return dict(await redis_client.pubsub_numsub(f"room:{room}"))[f"room:{room}".encode()]


async def wait_numsub(redis_client: aioredis.Redis, room: str, expected: int) -> None:
    for _ in range(200):
        if await numsub(redis_client, room) == expected:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"NUMSUB room:{room} never became {expected}: {await numsub(redis_client, room)}")


async def test_first_join_subscribes_once_and_last_leave_or_disconnect_unsubscribes(
    gateway: GatewayWorker, redis_client: aioredis.Redis
) -> None:
    a = await Client.connect(ws_url(gateway), "a")
    b = await Client.connect(ws_url(gateway), "b")
    assert await numsub(redis_client, "r1") == 0
    joined = await a.join("r1")
    assert joined == {"type": "joined", "room": "r1", "seq": 0}
    assert await numsub(redis_client, "r1") == 1  # confirmed before `joined`
    await b.join("r1")
    assert await numsub(redis_client, "r1") == 1  # one subscriber connection per process
    await a.send({"type": "leave", "room": "r1"})
    assert await a.expect("left") == {"type": "left", "room": "r1"}
    assert await numsub(redis_client, "r1") == 1  # b is still in
    await b.close()  # a disconnect counts as leaving
    await wait_numsub(redis_client, "r1", 0)
    await a.close()


async def test_published_events_reach_every_socket_of_the_room_once_in_order(
    gateway: GatewayWorker, redis_client: aioredis.Redis
) -> None:
    clients = [await Client.connect(ws_url(gateway), f"u{i}") for i in range(5)]
    for c in clients:
        await c.join("room-a")
    other = await Client.connect(ws_url(gateway), "other")
    await other.join("room-b")
    for seq in range(1, 51):
        await redis_client.publish("room:room-a", event("room-a", seq, extra_field={"kept": True}))
    # Redeliveries (a Kafka replay, a chat re-emit) must be dropped.
    await redis_client.publish("room:room-a", event("room-a", 25))
    await redis_client.publish("room:room-a", event("room-a", 51))
    for c in clients:
        got = await c.collect("room-a", 51)
        assert [m["seq"] for m in got] == list(range(1, 52))
        assert got[0]["extra_field"] == {"kept": True}  # passed through untouched
    with pytest.raises(asyncio.TimeoutError):
        await other.recv(timeout=0.3)
    for c in [*clients, other]:
        await c.close()


async def test_message_frame_is_the_published_bytes_inside_the_envelope(
    gateway: GatewayWorker, redis_client: aioredis.Redis
) -> None:
    c = await Client.connect(ws_url(gateway), "u")
    await c.join("r")
    payload = b'{"seq":1, "room":"r",  "odd spacing":[1,2]}'
    await redis_client.publish("room:r", payload)
    raw = await asyncio.wait_for(c.ws.recv(), scaled(5))
    assert raw == '{"type":"message","data":' + payload.decode() + "}"
    await c.close()


@pytest.mark.parametrize(
    ("frame", "code", "ref"),
    [
        ("not json", "bad_request", None),
        ("[1,2]", "bad_request", None),
        ('{"type":"join","room":5}', "bad_request", "join"),
        ('{"type":"dance"}', "bad_request", "dance"),
        ('{"type":"join","room":"no spaces"}', "bad_request", "join"),
        ('{"type":"join","room":"' + "x" * 129 + '"}', "bad_request", "join"),
        ('{"type":"message.send","room":"r","body":"' + "é" * 2049 + '","client_msg_id":"c-9"}', "too_large", "c-9"),
        ('{"type":"message.send","room":"r","client_msg_id":"c-8"}', "bad_request", "c-8"),
    ],
)
async def test_bad_frame_gets_an_error_and_the_socket_keeps_working(
    gateway: GatewayWorker, redis_client: aioredis.Redis, frame: str, code: str, ref: str | None
) -> None:
    c = await Client.connect(ws_url(gateway), "u")
    await c.send(frame)
    error = await c.expect("error")
    assert error["code"] == code
    assert error["ref"] == ref
    assert error["message"]
    # The socket lives on: a join still works and messages still arrive.
    await c.join("after")
    await redis_client.publish("room:after", event("after", 1))
    assert [m["seq"] for m in await c.collect("after", 1)] == [1]
    await c.close()


async def test_binary_frame_closes_with_1003(gateway: GatewayWorker) -> None:
    c = await Client.connect(ws_url(gateway), "u")
    await c.ws.send(b"\x01\x02")
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await c.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1003


async def test_frame_over_the_limit_closes_with_1009(gateway: GatewayWorker) -> None:
    c = await Client.connect(ws_url(gateway), "u")
    await c.send(json.dumps({"type": "join", "room": "r", "pad": "x" * (64 * 1024)}))
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await c.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


async def test_repeated_refused_frames_close_with_1008(redis_url: str) -> None:
    app = await start_gateway(base_config(redis_url, abuse_max_errors=5))
    try:
        c = await Client.connect(ws_url(app), "u")
        for _ in range(6):
            await c.send("nope")
        codes = []
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                codes.append((await c.recv())["code"])
        assert codes == ["bad_request"] * 6
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    finally:
        await app.drain()


async def test_post_without_kafka_is_answered_unavailable_and_fanout_still_works(
    gateway: GatewayWorker, redis_client: aioredis.Redis
) -> None:
    c = await Client.connect(ws_url(gateway), "u")
    await c.join("r")
    await c.send({"type": "message.send", "room": "r", "body": "hi", "client_msg_id": "c-1"})
    error = await c.expect("error")
    assert error == {"type": "error", "code": "unavailable", "message": error["message"], "ref": "c-1"}
    await redis_client.publish("room:r", event("r", 1))
    assert [m["seq"] for m in await c.collect("r", 1)] == [1]
    await c.close()


async def test_unknown_path_gets_404_and_health_answers(gateway: GatewayWorker) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    writer.close()
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(f"ws://127.0.0.1:{gateway.port}/nope")
    assert refused.value.response.status_code == 404


async def test_connection_cap_answers_503_at_the_upgrade(redis_url: str) -> None:
    app = await start_gateway(base_config(redis_url, max_connections=2))
    try:
        a = await Client.connect(ws_url(app), "a")
        b = await Client.connect(ws_url(app), "b")
        with pytest.raises(websockets.InvalidStatus) as refused:
            await Client.connect(ws_url(app), "c")
        assert refused.value.response.status_code == 503
        await a.close()
        await b.close()
    finally:
        await app.drain()


# ---- with the broker ----------------------------------------------------------------


@pytest.fixture
async def kafka_gateway(redis_url: str, kafka_bootstrap: str) -> AsyncIterator[GatewayWorker]:
    await ensure_topics(kafka_bootstrap, partitions=2)
    app = await start_gateway(base_config(redis_url, kafka_bootstrap=kafka_bootstrap, fetch_max_wait_ms=10))
    for _ in range(int(scaled(300))):
        if app.ready:
            break
        await asyncio.sleep(0.05)
    assert app.ready
    yield app
    await app.drain()


async def test_post_is_produced_to_message_ingest_keyed_by_room_then_acked(
    kafka_gateway: GatewayWorker, kafka_bootstrap: str
) -> None:
    c = await Client.connect(ws_url(kafka_gateway), "alice")
    await c.send({"type": "message.send", "room": "r7", "body": "héllo", "client_msg_id": "c-1"})
    assert await c.expect("ack", timeout=10) == {"type": "ack", "client_msg_id": "c-1"}
    await c.send({"type": "message.send", "room": "r7", "body": "no id"})
    generated = (await c.expect("ack", timeout=10))["client_msg_id"]
    assert generated.startswith("gw-")
    consumer = AIOKafkaConsumer(INGEST_TOPIC, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        records = []
        while len(records) < 2:
            batch = await consumer.getmany(timeout_ms=int(scaled(5000)))
            assert batch, "nothing on message.ingest"
            records += [r for rs in batch.values() for r in rs]
    finally:
        await consumer.stop()
    assert {r.key for r in records} == {b"r7"}
    first = decode_ingest(records[0].value)
    assert (first.room, first.user, first.body, first.client_msg_id) == ("r7", "alice", "héllo", "c-1")
    assert first.gateway == kafka_gateway.name and first.received_at > 0
    assert decode_ingest(records[1].value).client_msg_id == generated
    await c.close()


async def test_message_created_is_published_once_to_the_room_and_reaches_the_socket(
    kafka_gateway: GatewayWorker, kafka_bootstrap: str, redis_client: aioredis.Redis
) -> None:
    c = await Client.connect(ws_url(kafka_gateway), "u")
    await c.join("rk")
    counter = redis_client.pubsub()
    await counter.subscribe("room:rk")
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for seq in range(1, 21):
            await producer.send_and_wait(CREATED_TOPIC, event("rk", seq), key=b"rk")
    finally:
        await producer.stop()
    got = await c.collect("rk", 20, timeout=15)
    assert [m["seq"] for m in got] == list(range(1, 21))
    published = []
    loop = asyncio.get_running_loop()
    quiet_until = loop.time() + 1.0  # read until a second passes with nothing new
    while loop.time() < quiet_until:
        msg = await counter.get_message(ignore_subscribe_messages=True, timeout=0.1)
        if msg is not None:
            published.append(json.loads(msg["data"])["seq"])
            quiet_until = loop.time() + 1.0
    assert published == list(range(1, 21))  # exactly once each
    await counter.aclose()
    await c.close()


async def test_admin_port_serves_metrics_that_move_with_traffic_and_probes(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    from roomcast.embedded import free_port

    admin_port = free_port()
    app = await start_gateway(base_config(redis_url, admin_port=admin_port))

    async def get(path: str) -> tuple[int, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", admin_port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        raw = await reader.read()
        writer.close()
        head, _, body = raw.decode().partition("\r\n\r\n")
        return int(head.split()[1]), body

    def metric(text: str, name: str) -> float:
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"{name} not in /metrics")

    try:
        assert (await get("/healthz"))[0] == 200
        assert (await get("/readyz"))[0] == 200  # no Kafka configured: Redis is enough
        _, before = await get("/metrics")
        assert metric(before, "roomcast_gateway_deliveries_total") == 0
        clients = [await Client.connect(ws_url(app), f"u{i}") for i in range(3)]
        for c in clients:
            await c.join("m")
        for seq in range(1, 6):
            await redis_client.publish("room:m", event("m", seq))
        for c in clients:
            await c.collect("m", 5)
        _, after = await get("/metrics")
        assert metric(after, "roomcast_gateway_connections") == 3
        assert metric(after, "roomcast_gateway_rooms") == 1
        assert metric(after, "roomcast_gateway_joins_total") == 3
        assert metric(after, "roomcast_gateway_deliveries_total") == 15
        assert metric(after, "roomcast_gateway_fanout_latency_seconds_count") >= 1
        # Never a room or user id as a label: every label of every sample.
        assert not {"room", "user"} & label_names(after), sorted(label_names(after))
        for c in clients:
            await c.close()
    finally:
        await app.drain()


async def test_readyz_is_503_while_kafka_is_unreachable_and_posts_get_unavailable(redis_url: str) -> None:
    from roomcast.embedded import free_port

    admin_port = free_port()
    dead_kafka = f"127.0.0.1:{free_port()}"  # nothing listens there
    app = await start_gateway(base_config(redis_url, admin_port=admin_port, kafka_bootstrap=dead_kafka))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", admin_port)
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 503")
        writer.close()
        c = await Client.connect(ws_url(app), "u")
        await c.join("r")  # joins and fan-out still work
        await c.send({"type": "message.send", "room": "r", "body": "x", "client_msg_id": "c-1"})
        assert (await c.expect("error"))["code"] == "unavailable"
        await c.close()
    finally:
        await app.drain()


async def test_relay_rewinds_after_a_failed_publish_and_skips_nothing(kafka_bootstrap: str) -> None:
    """A PUBLISH that fails (Redis down) is retried from the batch's first record:
    every event is published, in order per room, and none is lost to the rewind."""
    await ensure_topics(kafka_bootstrap, partitions=2)
    rooms = ["rw-a", "rw-b", "rw-c"]
    published: list[tuple[str, int]] = []
    calls = 0

    async def publish(records: list[tuple[bytes, bytes]]) -> None:
        nonlocal calls
        calls += 1
        if calls in (2, 3):  # the second and third fetches fail, and are retried
            raise ConnectionError("redis is down")
        published.extend((k.decode(), json.loads(v)["seq"]) for k, v in records)

    relay = CreatedRelay(kafka_bootstrap, publish, fetch_max_wait_ms=10, client_id="t-rewind", max_records=5)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    await relay.start()
    try:
        for seq in range(1, 21):
            for room in rooms:
                await producer.send_and_wait(CREATED_TOPIC, event(room, seq), key=room.encode())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + scaled(20)
        while len(published) < 60 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert calls > 3, "the failing publishes were never retried"
        for room in rooms:
            seqs = [seq for r, seq in published if r == room]
            assert seqs == list(range(1, 21)), f"{room}: {seqs}"
    finally:
        await relay.aclose()
        await producer.stop()


async def test_a_join_with_since_while_history_is_down_never_resends_what_the_client_holds(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    # Found by the soak: a client rejoining with since=N while the chat service
    # was down got the whole room again from seq 1 once live events arrived.
    app = await start_gateway(base_config(redis_url, history_url=f"http://127.0.0.1:{free_port()}/"))
    try:
        client = await Client.connect(ws_url(app), "u")
        joined = await client.join("room-h", since=5)  # it holds 1..5; history cannot say more
        assert joined["seq"] == 5
        for seq in range(1, 9):
            await redis_client.publish("room:room-h", event("room-h", seq))
        got = await client.collect("room-h", 3)
        assert [m["seq"] for m in got] == [6, 7, 8]
        with pytest.raises(asyncio.TimeoutError):
            await client.recv(timeout=0.5)
        await client.close()
    finally:
        await app.drain()


async def test_a_third_partys_events_without_seq_pass_through_without_breaking_order_or_starting_fills(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    # PROTOCOL.md 6.7: a raw PUBLISH without seq is delivered unsequenced; the
    # relay's events keep their order and no gap (so no history fetch) is seen.
    app = await start_gateway(base_config(redis_url, history_url=f"http://127.0.0.1:{free_port()}/"))
    try:
        clients = [await Client.connect(ws_url(app), f"u{i}") for i in range(3)]
        for c in clients:
            await c.join("room-3p", since=0)
        for seq in range(1, 41):
            await redis_client.publish("room:room-3p", event("room-3p", seq))
            if seq % 4 == 0:
                bot = {"room": "room-3p", "user": "deploy-bot", "body": f"build {seq} done"}
                await redis_client.publish("room:room-3p", json.dumps(bot))
        for c in clients:
            got = await c.collect("room-3p", 50)
            sequenced = [m["seq"] for m in got if "seq" in m]
            assert sequenced == list(range(1, 41))
            assert [m["body"] for m in got if "seq" not in m] == [f"build {n} done" for n in range(4, 41, 4)]
        stats = app.registry.stats
        assert (stats.gaps, stats.gaps_filled, stats.gaps_unfilled, stats.events_unsequenced) == (0, 0, 0, 10)
        for c in clients:
            await c.close()
    finally:
        await app.drain()
