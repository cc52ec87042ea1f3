"""Slow consumers, abuse and fuzzing against a real in-process gateway and redis-server."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
import socket
import struct

import pytest
import redis.asyncio as aioredis
import websockets

from tests.integration.gateway_harness import base_config, start_gateway, ws_url
from tests.support import Client, event, scaled


class RawSocketClient:
    """A WebSocket client on a blocking socket with a tiny receive buffer, that
    reads only when told to: the slowest consumer there is."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(4096)
        self.buf = self.buf.split(b"\r\n\r\n", 1)[1]

    def send_text(self, text: str) -> None:
        payload = text.encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert len(payload) < 126
        self.sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)

    def read_until_close(self, timeout_s: float) -> tuple[int | None, int]:
        """Read everything; return (close code or None if reset, number of text frames)."""
        self.sock.settimeout(timeout_s)
        frames = 0
        while True:
            while len(self.buf) >= 2:
                opcode, length = self.buf[0] & 0x0F, self.buf[1] & 0x7F
                offset = 2
                if length == 126:
                    length, offset = struct.unpack("!H", self.buf[2:4])[0], 4
                elif length == 127:
                    length, offset = struct.unpack("!Q", self.buf[2:10])[0], 10
                if len(self.buf) < offset + length:
                    break
                payload, self.buf = self.buf[offset : offset + length], self.buf[offset + length :]
                if opcode == 0x8:
                    return struct.unpack("!H", payload[:2])[0], frames
                frames += 1
            try:
                chunk = self.sock.recv(1 << 16)
            except ConnectionResetError:
                return None, frames
            if not chunk:
                return None, frames
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


async def test_slow_consumer_is_closed_with_4000_and_the_others_get_everything(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    limit = 256 * 1024
    app = await start_gateway(base_config(redis_url, send_buffer_limit_bytes=limit))
    slow = await asyncio.to_thread(RawSocketClient, app.port, "/ws?user=slow")
    try:
        slow.send_text('{"type":"join","room":"big"}')
        fast = await Client.connect(ws_url(app), "fast")
        await fast.join("big")
        for _ in range(100):
            if len(app.registry.rooms["big"].members) == 2:
                break
            await asyncio.sleep(0.01)
        # The kernel holds up to tcp_wmem's max (4 MiB here, more elsewhere) for
        # a socket before the gateway's own buffer fills, so publish 1 MB at a
        # time until the slow socket is cut, up to far past any kernel buffer.
        body = "x" * 4000
        batch, count = 250, 0
        while app.hub.slow_consumers == 0 and count < 64 * batch:
            pipe = redis_client.pipeline(transaction=False)
            for seq in range(count + 1, count + batch + 1):
                pipe.publish("room:big", event("big", seq, body))
            await pipe.execute()
            count += batch
            await fast.collect("big", count, timeout=30)
        got = fast.messages["big"]
        assert [m["seq"] for m in got] == list(range(1, count + 1))
        assert app.hub.slow_consumers == 1
        # The slow socket left the room and its queued frames were freed.
        assert len(app.registry.rooms["big"].members) == 1
        assert all(c.session.user != "slow" for c in app.connections)
        code, frames = await asyncio.to_thread(slow.read_until_close, scaled(10))
        assert code == 4000
        assert frames < count
        await fast.close()
    finally:
        slow.close()
        await app.drain()


async def test_send_budget_answers_rate_limited_then_refills(redis_url: str) -> None:
    app = await start_gateway(base_config(redis_url, send_burst=3, send_rate_per_s=20))
    try:
        c = await Client.connect(ws_url(app), "u")
        for i in range(4):
            await c.send({"type": "message.send", "room": "r", "body": "hi", "client_msg_id": f"c{i}"})
        answers = [await c.expect("error") for _ in range(4)]
        # Without Kafka the first three are `unavailable`; the fourth was refused before that.
        assert sorted(a["code"] for a in answers) == ["rate_limited", "unavailable", "unavailable", "unavailable"]
        assert [a["ref"] for a in answers if a["code"] == "rate_limited"] == ["c3"]
        await asyncio.sleep(0.2)  # 20/s refills a token in 50 ms
        await c.send({"type": "message.send", "room": "r", "body": "hi", "client_msg_id": "c9"})
        assert (await c.expect("error"))["code"] == "unavailable"
        await c.close()
    finally:
        await app.drain()


def random_frame(rng: random.Random) -> str | bytes:
    """Random and malformed client frames, mostly near-valid (the interesting ones)."""
    kind = rng.randrange(10)
    junk = [None, True, 1.5, -1, 2**70, "", "x" * rng.randrange(300), [], {}, {"a": [1]}, "é🙂\u0000"]
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(40)))  # binary: closes 1003
    if kind == 1:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(50)))
    if kind == 2:
        return json.dumps(rng.choice(junk))
    frame: dict[str, object] = {"type": rng.choice(["join", "leave", "message.send", "JOIN", "", "x", None, 3])}
    for key in ("room", "since", "body", "client_msg_id", "extra"):
        if rng.random() < 0.7:
            frame[key] = rng.choice([*junk, "r1", "room-ok", 5, 0])
    return json.dumps(frame)


async def test_fuzzed_frames_never_crash_the_worker_or_escape_as_exceptions(
    redis_url: str, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    app = await start_gateway(base_config(redis_url, abuse_max_errors=10_000))
    rng = random.Random(1234)
    closes: dict[int, int] = {}
    try:
        caplog.set_level(logging.WARNING)
        sent = 0
        while sent < 3000:
            c = await Client.connect(ws_url(app), "fuzz")
            try:
                for _ in range(300):
                    frame = random_frame(rng)
                    await c.ws.send(frame)
                    sent += 1
                    if isinstance(frame, bytes):
                        break
                await c.ws.send(json.dumps({"type": "join", "room": "alive"}))
                while (await c.recv(timeout=5))["type"] != "joined":
                    pass
            except websockets.ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else 1006
                closes[code] = closes.get(code, 0) + 1
            finally:
                await c.close()
        assert set(closes) <= {1003}, closes  # only binary frames close a socket
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
        assert errors == [], [r.getMessage() for r in errors]
        # The worker still serves.
        ok = await Client.connect(ws_url(app), "ok")
        await ok.join("alive")
        await redis_client.publish("room:alive", event("alive", 1))
        assert [m["seq"] for m in await ok.collect("alive", 1)] == [1]
        await ok.close()
    finally:
        await app.drain()


async def test_a_peer_that_answers_no_ping_is_dropped_and_a_live_one_is_kept(redis_url: str) -> None:
    app = await start_gateway(base_config(redis_url, ping_interval_s=0.3, ping_timeout_s=0.2))
    # The raw client never reads, so it never answers a ping: a dead peer.
    dead = await asyncio.to_thread(RawSocketClient, app.port, "/ws?user=dead")
    try:
        live = await Client.connect(ws_url(app), "live")  # websockets answers pings by itself
        await live.join("hb")
        for _ in range(int(scaled(40))):
            if app.metrics.value("roomcast_gateway_dead_peer_drops_total") >= 1:
                break
            await asyncio.sleep(0.05)
        assert app.metrics.value("roomcast_gateway_dead_peer_drops_total") == 1
        assert {c.session.user for c in app.connections} == {"live"}
        await asyncio.sleep(1.0)  # several more sweeps: the live socket stays
        assert {c.session.user for c in app.connections} == {"live"}
        await live.close()
    finally:
        dead.close()
        await app.drain()
