"""The fault suite: the real stack under load while Redis restarts, a gateway
worker is killed, the chat service crashes and the broker freezes.

At the end it checks the promise of docs/PROTOCOL.md 3: every acked post is
stored exactly once, every room's seqs are gap-free, and every client holds
every message of its rooms since it first joined, exactly once and in order,
across its reconnects (`join` with `since`).

The default run is short; `pytest --long` runs the long variant.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import websockets
from aiokafka import AIOKafkaConsumer

from roomcast.embedded import start_redis
from roomcast.wire.events import INGEST_TOPIC, decode_ingest
from tests.e2e.stack import Stack, start_chat, start_gateway, start_stack
from tests.support import scaled

ROOMS = ["fault-a", "fault-b", "fault-c", "fault-d"]


@dataclass
class ResilientClient:
    """A client that posts continuously and rejoins with `since` after every disconnect."""

    name: str
    urls: list[str]
    rooms: list[str]
    post_interval_s: float
    start_seq: dict[str, int] = field(default_factory=dict)
    received: dict[str, list[int]] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)
    unacked: dict[str, dict[str, str]] = field(default_factory=dict)
    reconnects: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    recovered_false: int = 0
    posting: bool = True
    _n: int = 0

    def last_seq(self, room: str) -> int | None:
        seqs = self.received.get(room)
        if seqs:
            return seqs[-1]
        return self.start_seq.get(room)

    async def run(self, stop: asyncio.Event) -> None:
        attempt = 0
        while not stop.is_set():
            url = self.urls[attempt % len(self.urls)]
            attempt += 1
            try:
                async with websockets.connect(f"{url}?user={self.name}", open_timeout=3, close_timeout=1) as ws:
                    await self._session(ws, stop)
            except (OSError, asyncio.TimeoutError, websockets.WebSocketException):
                pass
            if not stop.is_set():
                self.reconnects += 1
                await asyncio.sleep(random.uniform(0.05, 0.3))

    async def _session(self, ws: websockets.ClientConnection, stop: asyncio.Event) -> None:
        for room in self.rooms:
            since = self.last_seq(room)
            frame = {"type": "join", "room": room} if since is None else {"type": "join", "room": room, "since": since}
            await ws.send(json.dumps(frame))
        # Posts not acked on an earlier connection are retried with the same id.
        for post in list(self.unacked.values()):
            await ws.send(json.dumps(post))
        reader = asyncio.create_task(self._read(ws))
        try:
            while not stop.is_set() and not reader.done():
                if self.posting:
                    self._n += 1
                    room = self.rooms[self._n % len(self.rooms)]
                    post = {"type": "message.send", "room": room, "body": f"{self.name}-{self._n}", "client_msg_id": f"{self.name}-{self._n}"}
                    self.unacked[post["client_msg_id"]] = post
                    await ws.send(json.dumps(post))
                await asyncio.sleep(self.post_interval_s)
        finally:
            reader.cancel()
            try:
                await reader
            except (asyncio.CancelledError, websockets.WebSocketException, OSError):
                pass

    async def _read(self, ws: websockets.ClientConnection) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            kind = frame["type"]
            if kind == "message":
                data = frame["data"]
                self.received.setdefault(data["room"], []).append(data["seq"])
            elif kind == "joined":
                self.start_seq.setdefault(frame["room"], frame["seq"])
                if frame.get("recovered") is False:
                    self.recovered_false += 1
            elif kind == "ack":
                self.acked.add(frame["client_msg_id"])
                self.unacked.pop(frame["client_msg_id"], None)
            elif kind == "error":
                self.refused[frame["code"]] += 1
                if frame["code"] == "unavailable" and frame["ref"] in self.unacked:
                    await asyncio.sleep(0.2)
                    await ws.send(json.dumps(self.unacked[frame["ref"]]))


def stored_messages(db_path: Path) -> list[tuple[str, int, str, str]]:
    db = sqlite3.connect(db_path)
    try:
        return db.execute("select room, seq, user_id, client_msg_id from messages order by room, seq").fetchall()
    finally:
        db.close()


async def locate_in_ingest(bootstrap: str, client_msg_ids: set[str]) -> dict[str, tuple[int, int] | None]:
    """Where each post sits in message.ingest, read from the start (no group): tells a broker
    that lost an acked record from a consumer that skipped one."""
    consumer = AIOKafkaConsumer(INGEST_TOPIC, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    found: dict[str, tuple[int, int] | None] = dict.fromkeys(client_msg_ids)
    try:
        idle = 0
        while idle < 5 and any(v is None for v in found.values()):
            batch = await consumer.getmany(timeout_ms=200)
            idle = 0 if batch else idle + 1
            for tp, records in batch.items():
                for r in records:
                    cid = decode_ingest(r.value).client_msg_id if r.value else ""
                    if cid in found:
                        found[cid] = (tp.partition, r.offset)
    finally:
        await consumer.stop()
    return found


async def run_fault_suite(tmp_path: Path, duration_s: float, rounds: int) -> None:
    stack = await asyncio.to_thread(start_stack, tmp_path, 2, 4)
    try:
        await _exercise(stack, duration_s, rounds)
    finally:
        await asyncio.to_thread(stack.stop)


async def _exercise(stack: Stack, duration_s: float, rounds: int) -> None:
    urls = [stack.ws_url(0), stack.ws_url(1)]
    clients = [
        ResilientClient(f"c{i}", urls[i % 2 :] + urls[: i % 2], random.Random(i).sample(ROOMS, 2), post_interval_s=0.1)
        for i in range(8)
    ]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(c.run(stop)) for c in clients]
    step = duration_s / (4 * rounds + 1)
    counts: Counter[str] = Counter()

    async def faults() -> None:
        for _ in range(rounds):
            await asyncio.sleep(step)
            # 1. Redis restarts on the same port: subscribers reconnect, rooms are checked.
            port = stack.redis.port
            await asyncio.to_thread(stack.redis.stop)
            await asyncio.sleep(0.5)
            stack.redis = await asyncio.to_thread(start_redis, "127.0.0.1", port, stack.data_dir / "redis.log")
            counts["redis restarts"] += 1
            await asyncio.sleep(step)
            # 2. A gateway worker dies: its clients reconnect to the other with since.
            victim = stack.gateways[counts["gateway kills"] % 2]
            victim.proc.kill()
            victim.proc.wait()
            counts["gateway kills"] += 1
            await asyncio.sleep(step / 2)
            replacement = await asyncio.to_thread(
                start_gateway, stack.redis_url, stack.kafka.address, stack.history_url, stack.logs, victim.port
            )
            stack.gateways[stack.gateways.index(victim)] = replacement
            await asyncio.sleep(step / 2)
            # 3. The chat service crashes and comes back.
            stack.chat.proc.kill()
            stack.chat.proc.wait()
            await asyncio.sleep(0.5)
            stack.chat = await asyncio.to_thread(start_chat, stack.data_dir, stack.kafka.address, stack.logs, stack.chat.port)
            counts["chat crashes"] += 1
            await asyncio.sleep(step)
            # 4. The broker freezes for a few seconds.
            os.kill(stack.kafka.proc.pid, signal.SIGSTOP)
            await asyncio.sleep(3)
            os.kill(stack.kafka.proc.pid, signal.SIGCONT)
            counts["broker freezes"] += 1

    await faults()
    await asyncio.sleep(step)
    for c in clients:
        c.posting = False
    # Let retries land and every room settle.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + scaled(90)
    while loop.time() < deadline:
        pending = sum(len(c.unacked) for c in clients)
        stored = await asyncio.to_thread(stored_messages, stack.data_dir / "chat.db")
        latest = Counter()
        for room, seq, _, _ in stored:
            latest[room] = max(latest[room], seq)
        behind = [(c.name, r) for c in clients for r in c.rooms if (c.last_seq(r) or 0) < latest[r]]
        if pending == 0 and not behind:
            break
        await asyncio.sleep(1)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)

    stored = await asyncio.to_thread(stored_messages, stack.data_dir / "chat.db")
    by_room: dict[str, list[int]] = {}
    for room, seq, _, _ in stored:
        by_room.setdefault(room, []).append(seq)
    ids = Counter((room, user, cid) for room, _, user, cid in stored)
    acked = {(c.name, cid) for c in clients for cid in c.acked}
    stored_ids = {(user, cid) for (_, user, cid) in ids}
    report = {
        **counts,
        "posts acked": len(acked),
        "messages stored": len(stored),
        "client reconnects": sum(c.reconnects for c in clients),
        "deliveries": sum(len(v) for c in clients for v in c.received.values()),
        "unavailable answers": sum(c.refused["unavailable"] for c in clients),
        "recovered:false": sum(c.recovered_false for c in clients),
        "unacked at end": sum(len(c.unacked) for c in clients),
    }
    print("\nfault suite:", json.dumps(report))
    # Every acked post stored exactly once.
    missing = sorted(acked - stored_ids)
    if missing:
        where = await locate_in_ingest(stack.kafka.address, {cid for _, cid in missing[:10]})
        warnings = [line for line in stack.logs if " WARNING " in line or " ERROR " in line][-30:]
        pytest.fail(
            f"acked but not stored: {missing[:10]}\nin message.ingest (partition, offset): {where}\n"
            "last warnings of the stack:\n" + "\n".join(warnings)
        )
    assert max(ids.values()) == 1, "a post was stored twice"
    # Every room's seqs are 1..n with no gap.
    for room, seqs in by_room.items():
        assert seqs == list(range(1, len(seqs) + 1)), f"room {room} seqs have a gap or repeat"
    # Every client holds every message since it first joined, once, in order.
    for c in clients:
        for room in c.rooms:
            got = c.received.get(room, [])
            expected = list(range(c.start_seq[room] + 1, len(by_room.get(room, [])) + 1))
            assert got == expected, (
                f"client {c.name} room {room}: {len(got)} received vs {len(expected)} expected; "
                f"dups {[s for s, n in Counter(got).items() if n > 1][:5]}, missing {sorted(set(expected) - set(got))[:5]}"
            )
    assert report["messages stored"] > 100
    assert report["recovered:false"] == 0


async def test_fault_suite_short(tmp_path: Path) -> None:
    await run_fault_suite(tmp_path, duration_s=40, rounds=1)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_fault_suite_long(tmp_path: Path) -> None:
    await run_fault_suite(tmp_path, duration_s=240, rounds=4)
