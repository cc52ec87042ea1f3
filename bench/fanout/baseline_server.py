"""The naive reference: what most teams would write from the seed text.

    python -m bench.fanout.baseline_server --port P --redis-url redis://127.0.0.1:RP

The `websockets` asyncio server, `redis.asyncio` pub/sub (one PubSub for the
process, SUBSCRIBE on a room's first join), `json.loads` of each Redis
message, `json.dumps` of the envelope and `await ws.send` per socket.

It speaks just enough of PROTOCOL.md for the load client: `join` -> `joined`
(seq 0: it keeps no history), and `{"type":"message","data":<event>}` frames.

One concession to correctness, which a team finds on its first day: the
PubSub connection is opened once at start-up (by subscribing a control
channel) so racing first joins cannot open two connections and silently
lose a room; the reader is a single task.
Plain asyncio (no uvloop), as the seed text would have it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from urllib.parse import parse_qs, urlparse

import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection, serve

__all__ = ["main"]

rooms: dict[str, set[ServerConnection]] = {}
pubsub: aioredis.client.PubSub


async def reader() -> None:
    while True:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if msg is None or msg["type"] != "message":
            continue
        channel = msg["channel"].decode()
        room = channel.removeprefix("room:")
        event = json.loads(msg["data"])
        frame = json.dumps({"type": "message", "data": event})
        for ws in list(rooms.get(room, ())):
            try:
                await ws.send(frame)
            except Exception:
                rooms.get(room, set()).discard(ws)


async def handler(ws: ServerConnection) -> None:
    query = parse_qs(urlparse(ws.request.path).query)  # ?user= names the user (dev mode)
    _user = query.get("user", ["anon"])[0]
    joined: set[str] = set()
    try:
        async for raw in ws:
            try:
                frame = json.loads(raw)
            except ValueError:
                await ws.send(json.dumps({"type": "error", "code": "bad_request", "message": "not json"}))
                continue
            if frame.get("type") == "join":
                room = frame["room"]
                members = rooms.setdefault(room, set())
                if not members:
                    await pubsub.subscribe(f"room:{room}")
                members.add(ws)
                joined.add(room)
                await ws.send(json.dumps({"type": "joined", "room": room, "seq": 0}))
            elif frame.get("type") == "leave":
                room = frame["room"]
                rooms.get(room, set()).discard(ws)
                joined.discard(room)
                await ws.send(json.dumps({"type": "left", "room": room}))
    finally:
        for room in joined:
            members = rooms.get(room)
            if members is not None:
                members.discard(ws)
                if not members:
                    del rooms[room]
                    await pubsub.unsubscribe(f"room:{room}")


async def amain(host: str, port: int, redis_url: str) -> None:
    global pubsub
    client = aioredis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    await pubsub.subscribe("roomcast:control")
    task = asyncio.create_task(reader())
    async with serve(handler, host, port):
        print(f"baseline ready port={port}", flush=True)
        await asyncio.Future()
    task.cancel()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--redis-url", required=True)
    args = p.parse_args(argv)
    try:
        asyncio.run(amain(args.host, args.port, args.redis_url))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
