"""Mixed faults against a real stack: a seeded schedule, its injector, the heal-time meter.

Used by the mixed-fault suite (tests/e2e/test_faults.py) and the soak command
(tests/e2e/soak.py). Faults overlap: each starts 0.5 to 3 s after the one
before, whatever the earlier ones are still doing (a freeze still frozen, a
group still rebalancing, a worker still restarting).

Time to heal, per fault: the time from the fault's start until every member
of every room has received a message with a seq above the highest seq the
store held when the fault started. Its bound is the fault's own target after
the fault ends (`HealTargets`); a fault that starts while an earlier one is
still within its bound extends that bound to its own, since the earlier one
cannot heal through the later one.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import websockets
from aiokafka import AIOKafkaConsumer

from roomcast.embedded import start_redis
from roomcast.wire.events import MessageEvent
from tests.e2e.stack import Stack, start_chat, start_gateway

__all__ = [
    "BROKER_KILL",
    "FAULT_KINDS",
    "Fault",
    "HealTargets",
    "ChaosClient",
    "ChaosRun",
    "draw_schedule",
    "latest_seqs",
    "produced_against_stored",
    "read_topic",
    "stored_messages",
]

# Every fault the suite knows. The first len(FAULT_KINDS) faults of a schedule
# are each kind once (shuffled), so every seed injects every kind.
FAULT_KINDS = (
    "pubsub_cut",  # CLIENT KILL TYPE pubsub: every gateway's subscriber connection is cut
    "redis_restart",  # Redis stopped and started again on its port
    "worker_kill",  # a gateway worker killed -9, restarted 0.5 s later (as the supervisor does)
    "chat_kill",  # the chat service killed -9 and restarted
    "chat_stop",  # the chat service frozen (SIGSTOP ... SIGCONT)
    "broker_stop",  # the Kafka broker frozen (SIGSTOP ... SIGCONT)
    "client_cut",  # one client socket cut in the middle of a frame it is sending
)
# On Apache Kafka only (Tansu keeps its log in memory: a restart loses it).
BROKER_KILL = "broker_kill"  # the broker killed -9 and started again on its data


@dataclass(frozen=True)
class Fault:
    at_s: float  # offset from the start of the run
    kind: str
    duration_s: float  # freeze length, downtime before a restart; 0 for an instant
    target: int  # which gateway or client, where the kind has several

    def describe(self) -> str:
        return f"{self.kind}@{self.at_s:.1f}s" + (f"/{self.duration_s:.1f}s" if self.duration_s else "")


@dataclass(frozen=True)
class HealTargets:
    """How long after a fault ends deliveries must have resumed, per kind (seconds).

    pubsub_cut, the freezes and worker_kill are the project's bars (README,
    "Delivery guarantees"); the others are ours: a Redis restart heals once
    the subscriber's next reconnect finds Redis back (its backoff doubles to
    2 s while Redis is away); a cut client reconnects after its backoff and
    rejoins with `since`. A chat crash may leave the embedded broker's
    group stuck with a leader that is gone (README, "Limits"): only the
    watchdog's rejoin mends that, so it gets the watchdog's bound and a join.
    """

    relay_session_s: float
    chat_watchdog_s: float

    def after_end(self, kind: str) -> float:
        return {
            "pubsub_cut": 1.0,
            "redis_restart": 2.0,
            "worker_kill": self.relay_session_s + 5.0,
            "chat_kill": self.chat_watchdog_s + 5.0,
            "chat_stop": 2.0,
            "broker_stop": 2.0,
            "client_cut": 2.0,
            # The restart itself (~6 s: the controller waits out the old broker's
            # 3 s session) is part of the healing; then every member rejoins.
            BROKER_KILL: self.chat_watchdog_s + 8.0,
        }[kind]


# The consumer groups each kind of fault disturbs, and the fault that makes a member rejoin.
GROUPS_DISTURBED = {
    "worker_kill": ("relay",),
    "chat_kill": ("chat",),
    "chat_stop": ("chat",),
    "broker_stop": ("relay", "chat"),
    BROKER_KILL: ("relay", "chat"),
}
KILL_OF = {"relay": "worker_kill", "chat": "chat_kill"}


def draw_schedule(
    seed: int,
    count: int,
    gateways: int,
    clients: int,
    spacing_s: tuple[float, float] = (0.5, 3.0),
    fault_kinds: tuple[str, ...] = FAULT_KINDS,
) -> list[Fault]:
    """A seeded list of `count` faults (at least one of each kind), `spacing_s` apart (0.5-3 s).

    Never two freezes (or a freeze and a kill) of one process at once: the
    first SIGCONT would end the second early. Everything else may overlap.
    With BROKER_KILL among the kinds, one broker kill is moved to 0.3 s after
    the first worker kill, while the relay's group rebalances (it may then
    overlap another broker fault: the injector skips a kill of a broker that
    is down, and a freeze of a dead one).
    """
    rng = random.Random(seed)
    kinds = list(fault_kinds)
    rng.shuffle(kinds)
    kinds += [rng.choice(fault_kinds) for _ in range(max(0, count - len(kinds)))]
    faults: list[Fault] = []
    frozen_until: dict[str, float] = {}
    at = rng.uniform(1.0, 3.0)
    for kind in kinds:
        duration = {
            "redis_restart": rng.uniform(0.2, 1.0),
            "chat_kill": rng.uniform(0.2, 1.0),
            "chat_stop": rng.uniform(1.0, 3.0),
            "broker_stop": rng.uniform(1.0, 4.0),
            BROKER_KILL: rng.uniform(0.2, 1.0),
        }.get(kind, 0.0)
        victim = "chat" if kind in ("chat_stop", "chat_kill") else "broker" if kind in ("broker_stop", BROKER_KILL) else ""
        exclusive = kind.endswith("_stop") or kind == BROKER_KILL
        if victim and exclusive and frozen_until.get(victim, 0.0) > at:
            at = frozen_until[victim] + 0.1
        if exclusive:
            # A killed broker is down for its restart too (~6 s).
            frozen_until[victim] = at + duration + (7.0 if kind == BROKER_KILL else 0.0)
        target = rng.randrange(clients if kind == "client_cut" else gateways)
        faults.append(Fault(round(at, 2), kind, round(duration, 2), target))
        at += rng.uniform(*spacing_s)
    kill = next((f for f in faults if f.kind == "worker_kill"), None)
    broker_kill = next((f for f in faults if f.kind == BROKER_KILL), None)
    if kill is not None and broker_kill is not None:
        faults[faults.index(broker_kill)] = Fault(round(kill.at_s + 0.3, 2), BROKER_KILL, broker_kill.duration_s, 0)
        faults.sort(key=lambda f: f.at_s)
    return faults


def stored_messages(db_path: Path) -> list[tuple[str, int, str, str]]:
    """(room, seq, user, client_msg_id) of every stored message, by room and seq."""
    db = sqlite3.connect(db_path, timeout=10)
    try:
        return db.execute("select room, seq, user_id, client_msg_id from messages order by room, seq").fetchall()
    finally:
        db.close()


async def read_topic(bootstrap: str, topic: str) -> list[tuple[int, int, bytes]]:
    """(partition, offset, value) of every record of topic, read from the start with no group."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    records: list[tuple[int, int, bytes]] = []
    try:
        idle = 0
        while idle < 5:
            batch = await consumer.getmany(timeout_ms=200)
            idle = 0 if batch else idle + 1
            records += [(tp.partition, r.offset, r.value or b"") for tp, rs in batch.items() for r in rs]
    finally:
        await consumer.stop()
    return records


def produced_against_stored(produced: list[MessageEvent], stored: list[tuple[str, int, str, str]]) -> list[str]:
    """Where message.created disagrees with the store: a post under two seqs, a seq given to
    two posts, or a stored message never produced. Re-emits of the same event are fine."""
    seqs_of: dict[tuple[str, str, str], set[int]] = {}
    posts_at: dict[tuple[str, int], set[tuple[str, str]]] = {}
    for e in produced:
        seqs_of.setdefault((e.room, e.user, e.client_msg_id), set()).add(e.seq)
        posts_at.setdefault((e.room, e.seq), set()).add((e.user, e.client_msg_id))
    problems = [f"{post} produced with seqs {sorted(seqs)}" for post, seqs in seqs_of.items() if len(seqs) > 1]
    problems += [f"{room} seq {seq} produced for {sorted(posts)}" for (room, seq), posts in posts_at.items() if len(posts) > 1]
    for room, seq, user, cid in stored:
        if posts_at.get((room, seq), {(user, cid)}) != {(user, cid)}:
            problems.append(f"{room} seq {seq}: stored for {user}/{cid}, produced for {sorted(posts_at[(room, seq)])}")
        elif (room, seq) not in posts_at:
            problems.append(f"{room} seq {seq} ({user}/{cid}) stored but never produced")
    return problems


def latest_seqs(db_path: Path) -> dict[str, int]:
    db = sqlite3.connect(db_path, timeout=10)
    try:
        return dict(db.execute("select room, max(seq) from messages group by room").fetchall())
    finally:
        db.close()


@dataclass
class ChaosClient:
    """Posts continuously; after every disconnect reconnects (to the next URL) and rejoins with `since`.

    Keeps every delivered seq with its arrival time, and re-sends a post that
    was not acked with the same client_msg_id.
    """

    name: str
    urls: list[str]
    rooms: list[str]
    post_interval_s: float
    start_seq: dict[str, int] = field(default_factory=dict)
    received: dict[str, list[int]] = field(default_factory=dict)
    arrivals: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)
    unacked: dict[str, dict[str, str]] = field(default_factory=dict)
    reconnects: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    recovered_false: int = 0
    posting: bool = True
    last_frame_at: float = 0.0
    _n: int = 0
    _retry: deque[str] = field(default_factory=deque)  # unacked client_msg_ids to send again, in order
    _ws: Any = None

    def last_seq(self, room: str) -> int | None:
        seqs = self.received.get(room)
        if seqs:
            return seqs[-1]
        return self.start_seq.get(room)

    def first_arrival_above(self, room: str, seq: int) -> float | None:
        for at, s in self.arrivals.get(room, ()):
            if s > seq:
                return at
        return None

    async def run(self, stop: asyncio.Event) -> None:
        attempt = 0
        while not stop.is_set():
            url = self.urls[attempt % len(self.urls)]
            attempt += 1
            try:
                async with websockets.connect(f"{url}?user={self.name}", open_timeout=3, close_timeout=1) as ws:
                    self._ws = ws
                    await self._session(ws, stop)
            except (OSError, asyncio.TimeoutError, websockets.WebSocketException):
                pass
            finally:
                self._ws = None
            if not stop.is_set():
                self.reconnects += 1
                await asyncio.sleep(random.uniform(0.05, 0.3))

    def cut_mid_frame(self) -> bool:
        """Write the first half of a masked text frame, then abort the TCP connection."""
        ws = self._ws
        if ws is None:
            return False
        payload = json.dumps({"type": "message.send", "room": self.rooms[0], "body": "x" * 200}).encode()
        header = bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big") + os.urandom(4)
        ws.transport.write(header + payload[: len(payload) // 2])
        ws.transport.abort()
        return True

    async def _session(self, ws: websockets.ClientConnection, stop: asyncio.Event) -> None:
        for room in self.rooms:
            since = self.last_seq(room)
            frame = {"type": "join", "room": room} if since is None else {"type": "join", "room": room, "since": since}
            await ws.send(json.dumps(frame))
        # Posts not acked on an earlier connection are retried with the same id,
        # one per tick like new posts: a backlog sent at once would exceed the
        # send budget, and the refusals would get the socket closed as abusive
        # (1008) on every reconnect, for ever (seen on Kafka, whose broker kill
        # leaves a longer backlog than Tansu's freeze).
        self._retry = deque(self.unacked)
        reader = asyncio.create_task(self._read(ws))
        try:
            while not stop.is_set() and not reader.done():
                post = self._next_retry()
                if post is None and self.posting:
                    self._n += 1
                    room = self.rooms[self._n % len(self.rooms)]
                    cid = f"{self.name}-{self._n}"
                    post = self.unacked[cid] = {"type": "message.send", "room": room, "body": cid, "client_msg_id": cid}
                if post is not None:
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
            self.last_frame_at = time.monotonic()
            frame = json.loads(raw)
            kind = frame["type"]
            if kind == "message":
                data = frame["data"]
                self.received.setdefault(data["room"], []).append(data["seq"])
                self.arrivals.setdefault(data["room"], []).append((time.monotonic(), data["seq"]))
            elif kind == "joined":
                self.start_seq.setdefault(frame["room"], frame["seq"])
                if frame.get("recovered") is False:
                    self.recovered_false += 1
            elif kind == "ack":
                self.acked.add(frame["client_msg_id"])
                self.unacked.pop(frame["client_msg_id"], None)
            elif kind == "error":
                self.refused[frame["code"]] += 1
                if frame["code"] == "unavailable" and frame.get("ref") in self.unacked and frame["ref"] not in self._retry:
                    self._retry.append(frame["ref"])

    def _next_retry(self) -> dict[str, str] | None:
        while self._retry:
            post = self.unacked.get(self._retry.popleft())
            if post is not None:  # not acked meanwhile
                return post
        return None


@dataclass
class HealRecord:
    fault: Fault
    started: float  # monotonic
    ended: float  # monotonic: when the fault's own action is planned to be over (a thaw, a restart)
    latest_before: dict[str, int]
    heal_s: float | None = None  # from started; None: not healed
    bound_s: float = 0.0  # from started
    isolated: bool = False  # no other fault's recovery window overlapped this one's


@dataclass
class ChaosRun:
    """A seeded schedule played against a stack while clients post, then checked."""

    stack: Stack
    faults: list[Fault]
    targets: HealTargets
    clients: list[ChaosClient]
    log: Callable[[str], None] = print
    records: list[HealRecord] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)

    _supervisor: asyncio.Task[None] | None = None
    _restarting: set[str] = field(default_factory=set)

    @property
    def db_path(self) -> Path:
        return self.stack.data_dir / "chat.db"

    def supervise(self) -> None:
        """Restart a service that exits by itself (a watchdog's exit), as Kubernetes would."""
        self._supervisor = asyncio.get_running_loop().create_task(self._supervise())

    async def stop_supervising(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            chat = self.stack.chat
            if not chat.alive() and "chat" not in self._restarting:
                self.counts["chat exits"] += 1
                self.log(f"the chat service exited by itself ({chat.proc.returncode}); restarting it")
                self.stack.chat = await asyncio.to_thread(
                    start_chat, self.stack.data_dir, self.stack.kafka.address, self.stack.logs, chat.port, *self.stack.chat_args
                )
            for i, gateway in enumerate(list(self.stack.gateways)):
                if not gateway.alive() and f"gateway{i}" not in self._restarting:
                    self.counts["gateway exits"] += 1
                    self.log(f"gateway {i} exited by itself ({gateway.proc.returncode}); restarting it")
                    self.stack.gateways[i] = await asyncio.to_thread(
                        start_gateway, self.stack.redis_url, self.stack.kafka.address, self.stack.history_url,
                        self.stack.logs, gateway.port, *self.stack.gateway_args,
                    )

    async def play(self) -> None:
        """Inject every fault at its time (each in its own task, so they overlap); wait for all."""
        loop = asyncio.get_running_loop()
        origin = loop.time()
        tasks = []
        for fault in self.faults:
            await asyncio.sleep(max(0.0, origin + fault.at_s - loop.time()))
            tasks.append(asyncio.create_task(self._inject(fault)))
        await asyncio.gather(*tasks)

    async def _inject(self, fault: Fault) -> None:
        latest = await asyncio.to_thread(latest_seqs, self.db_path)
        started = time.monotonic()
        # Its planned end: a restart's own start-up time is part of the healing.
        self.records.append(HealRecord(fault, started, started + fault.duration_s, latest))
        self.log(f"fault {fault.describe()} target={fault.target}")
        self.stack.logs.append(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ==== fault {fault.describe()} target={fault.target}")
        await getattr(self, "_" + fault.kind)(fault)
        self.counts[fault.kind] += 1

    async def _pubsub_cut(self, fault: Fault) -> None:
        client = aioredis.Redis.from_url(self.stack.redis_url, socket_timeout=5)
        try:
            await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        except (OSError, aioredis.RedisError) as exc:  # Redis restarting meanwhile: nothing to cut
            self.log(f"pubsub_cut found no Redis: {exc}")
        finally:
            await client.aclose()

    async def _redis_restart(self, fault: Fault) -> None:
        if "redis" in self._restarting:
            return  # already down for an earlier restart
        self._restarting.add("redis")
        try:
            port = self.stack.redis.port
            await asyncio.to_thread(self.stack.redis.stop)
            await asyncio.sleep(fault.duration_s)
            self.stack.redis = await asyncio.to_thread(start_redis, "127.0.0.1", port, self.stack.data_dir / "redis.log")
        finally:
            self._restarting.discard("redis")

    async def _worker_kill(self, fault: Fault) -> None:
        victim = self.stack.gateways[fault.target]
        name = f"gateway{fault.target}"
        if not victim.alive() or name in self._restarting:
            return  # still being restarted after an earlier kill
        self._restarting.add(name)
        try:
            victim.proc.kill()
            await asyncio.to_thread(victim.proc.wait)
            await asyncio.sleep(0.5)  # the supervisor's restart delay
            self.stack.gateways[fault.target] = await asyncio.to_thread(
                start_gateway, self.stack.redis_url, self.stack.kafka.address, self.stack.history_url, self.stack.logs,
                victim.port, *self.stack.gateway_args,
            )
        finally:
            self._restarting.discard(name)

    async def _chat_kill(self, fault: Fault) -> None:
        victim = self.stack.chat
        if not victim.alive() or "chat" in self._restarting:
            return
        self._restarting.add("chat")
        try:
            victim.proc.kill()
            await asyncio.to_thread(victim.proc.wait)
            await asyncio.sleep(fault.duration_s)
            self.stack.chat = await asyncio.to_thread(
                start_chat, self.stack.data_dir, self.stack.kafka.address, self.stack.logs, victim.port, *self.stack.chat_args
            )
        finally:
            self._restarting.discard("chat")

    async def _freeze(self, pid: int, seconds: float) -> None:
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return
        try:
            await asyncio.sleep(seconds)
        finally:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    async def _chat_stop(self, fault: Fault) -> None:
        await self._freeze(self.stack.chat.proc.pid, fault.duration_s)

    async def _broker_stop(self, fault: Fault) -> None:
        await self._freeze(self.stack.kafka.proc.pid, fault.duration_s)

    async def _broker_kill(self, fault: Fault) -> None:
        from roomcast.apache_kafka import restart_kafka

        broker = self.stack.kafka
        if not broker.alive() or "broker" in self._restarting:
            return
        self._restarting.add("broker")
        try:
            broker.proc.kill()
            await asyncio.to_thread(broker.proc.wait)
            await asyncio.sleep(fault.duration_s)
            await asyncio.to_thread(restart_kafka, broker)
        finally:
            self._restarting.discard("broker")

    async def _client_cut(self, fault: Fault) -> None:
        if not self.clients[fault.target].cut_mid_frame():
            self.log(f"client_cut: {self.clients[fault.target].name} was not connected")

    # ---- the end of a run -----------------------------------------------------------

    async def settle(self, timeout_s: float) -> None:
        """Stop posting; wait until every post is acked and stored and every client holds the latest seqs."""
        for c in self.clients:
            c.posting = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            stored = await asyncio.to_thread(stored_messages, self.db_path)
            latest: dict[str, int] = {}
            for room, seq, _, _ in stored:
                latest[room] = max(latest.get(room, 0), seq)
            ids = {(user, cid) for _, _, user, cid in stored}
            settled = (
                not any(c.unacked for c in self.clients)
                and all((c.name, cid) in ids for c in self.clients for cid in c.acked)
                and all((c.last_seq(r) or 0) >= latest.get(r, 0) for c in self.clients for r in c.rooms)
            )
            if settled:
                return
            await asyncio.sleep(1)

    def problems(self, stored: list[tuple[str, int, str, str]]) -> dict[str, list[str]]:
        """What broke the promise, by check (empty lists: kept). Call after settle() and measure_heals().

        acked-not-stored: (user, client_msg_id); gaps: rooms whose
        seqs are not 1..n; incomplete: clients that do not hold every stored
        message of a room since they joined, once and in order; late: faults
        whose deliveries did not resume within their bound.
        """
        acked = {(c.name, cid) for c in self.clients for cid in c.acked}
        ids = Counter((user, cid) for _, _, user, cid in stored)
        by_room: dict[str, list[int]] = {}
        for room, seq, _, _ in stored:
            by_room.setdefault(room, []).append(seq)
        incomplete = []
        for c in self.clients:
            for room in c.rooms:
                got = c.received.get(room, [])
                expected = list(range(c.start_seq[room] + 1, len(by_room.get(room, [])) + 1))
                if got != expected:
                    incomplete.append(
                        f"client {c.name} room {room} ({c.reconnects} reconnects, {'connected' if c._ws is not None else 'not connected'}, "
                        f"last frame {time.monotonic() - c.last_frame_at:.1f} s ago): {len(got)} received vs {len(expected)} expected; dups "
                        f"{[s for s, n in Counter(got).items() if n > 1][:5]}, missing {sorted(set(expected) - set(got))[:5]}"
                    )
        return {
            "acked-not-stored": [f"{user}/{cid}" for user, cid in sorted(acked - set(ids))],
            "gaps": [room for room, seqs in by_room.items() if seqs != list(range(1, len(seqs) + 1))],
            "incomplete": incomplete,
            "late": self.unhealed(),
        }

    def report(self, stored: list[tuple[str, int, str, str]]) -> dict[str, object]:
        return {
            **self.counts,
            "posts acked": sum(len(c.acked) for c in self.clients),
            "messages stored": len(stored),
            "client reconnects": sum(c.reconnects for c in self.clients),
            "deliveries": sum(len(v) for c in self.clients for v in c.received.values()),
            "unavailable answers": sum(c.refused["unavailable"] for c in self.clients),
            "recovered:false": sum(c.recovered_false for c in self.clients),
            "unacked at end": sum(len(c.unacked) for c in self.clients),
        }

    # ---- heal times --------------------------------------------------------------

    def measure_heals(self) -> None:
        """Fill each record's heal time and bound from the clients' arrival times.

        A fault's bound is its own deadline (its end plus its kind's target),
        stretched to the deadline of any other fault whose recovery window it
        overlaps: one that began earlier and is not yet due, or one that
        begins before this one is due (chained). A fault that disturbs a
        consumer group (GROUPS_DISTURBED) while a killed member of that group
        is still within its rejoin bound gets the kill's target from its own
        end: on the embedded broker a member frozen or killed again while it
        joins starts its join over.
        """
        by_start = sorted(self.records, key=lambda r: r.started)
        due = [r.ended + self.targets.after_end(r.fault.kind) for r in by_start]
        # A fault that hits a consumer group while a killed member of it is still
        # rejoining sets that rejoin back to the start: its bound is the kill's.
        rejoining: dict[str, float] = {}  # group -> when its rejoin after a kill is due
        for i, r in enumerate(by_start):
            for group in GROUPS_DISTURBED.get(r.fault.kind, ()):
                if rejoining.get(group, 0.0) >= r.started:
                    due[i] = max(due[i], r.ended + self.targets.after_end(KILL_OF[group]))
                if r.fault.kind == KILL_OF[group]:
                    rejoining[group] = max(rejoining.get(group, 0.0), due[i])
        for i, record in enumerate(by_start):
            healed = 0.0
            for client in self.clients:
                for room in client.rooms:
                    at = client.first_arrival_above(room, record.latest_before.get(room, 0))
                    healed = float("inf") if at is None else max(healed, at - record.started)
            record.heal_s = None if healed == float("inf") else healed
            overlapping = [due[j] for j in range(i) if due[j] >= record.started]
            deadline = max([due[i], *overlapping])
            for j in range(i + 1, len(by_start)):
                if by_start[j].started > deadline:
                    break
                overlapping.append(due[j])
                deadline = max(deadline, due[j])
            record.bound_s = deadline - record.started
            record.isolated = not overlapping

    def heal_table(self) -> dict[str, dict[str, float]]:
        """Per kind: faults, the max heal time and bound, and the max heal among faults nothing else overlapped."""
        table: dict[str, dict[str, float]] = {}
        for record in self.records:
            row = table.setdefault(
                record.fault.kind, {"faults": 0, "max_heal_s": 0.0, "max_bound_s": 0.0, "isolated": 0, "max_isolated_heal_s": 0.0}
            )
            row["faults"] += 1
            heal = record.heal_s if record.heal_s is not None else float("inf")
            row["max_heal_s"] = round(max(row["max_heal_s"], heal), 2)
            row["max_bound_s"] = round(max(row["max_bound_s"], record.bound_s), 2)
            if record.isolated:
                row["isolated"] += 1
                row["max_isolated_heal_s"] = round(max(row["max_isolated_heal_s"], heal), 2)
        return table

    def unhealed(self) -> list[str]:
        """Faults whose deliveries did not resume within their bound, described."""
        late = []
        for r in self.records:
            if r.heal_s is None or r.heal_s > r.bound_s:
                heal = "never" if r.heal_s is None else f"{r.heal_s:.2f} s"
                late.append(f"{r.fault.describe()}: healed {heal}, bound {r.bound_s:.2f} s")
        return late
