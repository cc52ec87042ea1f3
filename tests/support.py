"""Helpers for tests that talk to a real gateway over real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

TIMEOUT_FACTOR = float(os.environ.get("ROOMCAST_TEST_TIMEOUT_FACTOR", "1"))

TEST_BROKER = os.environ.get("ROOMCAST_TEST_BROKER", "tansu")
"""The broker every test stack runs on: tansu (the default, no Java) or kafka (Apache Kafka)."""
REQUIRE_KAFKA = os.environ.get("ROOMCAST_REQUIRE_KAFKA") == "1"
"""CI: a missing JDK or Maven fails the Kafka runs instead of skipping them."""


def scaled(seconds: float) -> float:
    return seconds * TIMEOUT_FACTOR


def event(room: str, seq: int, body: str = "hi", **extra: Any) -> bytes:
    """A message event payload as the chat service would publish it."""
    data = {
        "id": f"01TEST{seq:020d}",
        "room": room,
        "seq": seq,
        "user": "u",
        "body": body,
        "client_msg_id": f"c-{seq}",
        "ts": 1732650000000 + seq,
        **extra,
    }
    return json.dumps(data, separators=(",", ":")).encode()


class Client:
    """A protocol client over the `websockets` library (independent of the server's picows)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.messages: dict[str, list[dict[str, Any]]] = {}

    @classmethod
    async def connect(cls, url: str, user: str | None = None, **kwargs: Any) -> Client:
        if user is not None:
            url = f"{url}{'&' if '?' in url else '?'}user={user}"
        ws = await websockets.connect(url, max_size=None, open_timeout=scaled(10), **kwargs)
        return cls(ws)

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), scaled(timeout))
        frame = json.loads(raw)
        if frame.get("type") == "message":
            data = frame["data"]
            self.messages.setdefault(data["room"], []).append(data)
        return frame

    async def expect(self, type_: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next frame of this type; message frames on the way are kept in self.messages."""
        while True:
            frame = await self.recv(timeout)
            if frame["type"] == type_:
                return frame
            if frame["type"] != "message":
                raise AssertionError(f"expected {type_}, got {frame}")

    async def join(self, room: str, since: int | None = None) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "join", "room": room}
        if since is not None:
            frame["since"] = since
        await self.send(frame)
        return await self.expect("joined")

    async def collect(self, room: str, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Read until `count` messages of room were received (in total); return them."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + scaled(timeout)
        while len(self.messages.get(room, [])) < count:
            remaining = deadline - loop.time()
            if remaining <= 0:
                got = [m["seq"] for m in self.messages.get(room, [])]
                raise AssertionError(f"room {room}: got {len(got)} of {count} messages: seqs {got}")
            await self.recv(remaining / TIMEOUT_FACTOR)
        return self.messages[room]

    async def close(self) -> None:
        await self.ws.close()


async def close_code(c: Client, timeout: float = 5.0) -> int:
    """Read until the server closes the socket; its close code."""
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await c.recv(timeout)
    assert closed.value.rcvd is not None, "no close frame from the server"
    return closed.value.rcvd.code


async def revoke(redis_url: str, *args: str) -> str:
    """Run the real `roomcast revoke` command."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "roomcast.cli", "revoke", *args, "--redis-url", redis_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()
