"""Hop latency benchmarks: real processes, fixed rates, percentiles.

    python -m bench.hops                     # all three hops, ~2 minutes
    python -m bench.hops --hops redis        # one hop
    python -m bench.hops --smoke             # a few seconds per hop; fails on any loss
    flock /tmp/roomcast-bench.lock python -m bench.hops ...   # on a shared box

Hops (each starts its own processes on free loopback ports and stops them):

redis   PUBLISH on room:<id> -> one gateway worker (`roomcast gateway`, no
        Kafka, no history) -> every member socket. Latency: the publisher's
        time.monotonic_ns() in an extra field `t_ns` of the event, read by the
        client (PROTOCOL.md 4: extra fields pass through untouched).
kafka   (1) produce on message.created -> the gateway's consumer in
        realtime-gateway-group -> PUBLISH -> the gateway -> every member;
        (2) message.send -> ack (the gateway's produce to message.ingest,
        acks=all). Tansu broker, no chat service.
e2e     the full stack of roomcast/devstack.py (Redis, Tansu, chat on SQLite,
        gateways with history): message.send on one member of a room ->
        every member of the room, keyed by client_msg_id; also send -> ack.

Method: every room gets messages round-robin at a fixed total rate (paced on
the loop clock, not flat out); the first --warmup seconds are sent and checked
but not counted; latencies go into a full sample list (percentiles are exact,
nearest rank) and a log-bucket histogram in the JSON. Before the paced run
each room gets one probe message that every member must receive (so consumer
group assignment and joins are done). After the last send the run waits for
every delivery, then counts the lost, duplicated and out-of-order ones.

Placement: the gateway worker(s) are pinned to CPU 0 and this process (all
client sockets, the publisher/producer) to CPU 1 with taskset/sched_setaffinity
when the machine has 2+ CPUs (--no-pin to turn off); Redis, Tansu and chat are
left to the scheduler. All clients live in this process on one uvloop with
picows: its own per-frame work (about 2-4 us) is inside the figures.

Exit status: 1 when anything was lost, doubled or reordered, a hop failed,
or a budget was missed (--smoke: missed 10 times over, bench/checks.py).
The JSON goes to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from bench.checks import GROSS_BREACH_FACTOR, over_budget
from bench.harness import CpuMeter, ProfileCounts, machine_facts, pin, pin_threads, py_spy_record, raise_fd_limit, unpin, wait_py_spy

__all__ = ["main"]

NS_PER_MS = 1_000_000

# Budgets (issue: hop latency): percentile -> (comparison, milliseconds).
BUDGETS: dict[str, dict[str, tuple[str, float]]] = {
    "redis publish->client": {"p50": ("<=", 0.5), "p99": ("<=", 2.0)},
    "kafka produce->client": {"p99": ("<", 20.0)},
    "kafka send->ack": {"p99": ("<", 20.0)},
    "e2e send->members": {"p99": ("<", 25.0)},
    "e2e send->ack": {},
}


# ---- what the clients read ------------------------------------------------------------


class _Data(msgspec.Struct):
    room: str = ""
    seq: int = 0
    client_msg_id: str = ""
    t_ns: int = 0
    ts: int = 0


class _Frame(msgspec.Struct):
    type: str
    data: _Data | None = None
    room: str = ""
    seq: int = 0
    client_msg_id: str = ""
    code: str = ""
    message: str = ""


_decode_frame = msgspec.json.Decoder(_Frame).decode


# ---- samples ----------------------------------------------------------------------------


@dataclass
class Series:
    """Latency samples of one hop, in nanoseconds."""

    name: str
    samples: list[int] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)  # monotonic send time of each sample

    def add(self, t0: int, latency: int) -> None:
        self.sent.append(t0)
        self.samples.append(latency)

    def windows(self, width_s: float = 5.0) -> list[dict[str, float]]:
        """p50/p99 per window of send time: shows drift over the run (a broker slowing down)."""
        if not self.sent:
            return []
        first = min(self.sent)
        width = int(width_s * 1e9)
        buckets: dict[int, list[int]] = {}
        for t0, lat in zip(self.sent, self.samples):
            buckets.setdefault((t0 - first) // width, []).append(lat)
        out = []
        for b in sorted(buckets):
            v = sorted(buckets[b])
            out.append({
                "from_s": b * width_s,
                "n": len(v),
                "p50_ms": v[len(v) // 2] / NS_PER_MS,
                "p99_ms": v[min(len(v) - 1, int(len(v) * 0.99))] / NS_PER_MS,
            })
        return out

    def summary(self) -> dict[str, Any]:
        s = sorted(self.samples)
        n = len(s)

        def pct(p: float) -> float:
            if not n:
                return float("nan")
            return s[min(n - 1, max(0, math.ceil(p / 100 * n) - 1))] / NS_PER_MS

        return {
            "samples": n,
            "p50_ms": pct(50),
            "p90_ms": pct(90),
            "p99_ms": pct(99),
            "p99_9_ms": pct(99.9),
            "max_ms": s[-1] / NS_PER_MS if n else float("nan"),
            "windows_5s": self.windows(),
            "histogram_us": _histogram(s),
        }


def _histogram(sorted_ns: list[int]) -> list[list[float]]:
    """[upper bound in us, count] buckets, 10 per decade from 10 us (an HDR-like log histogram)."""
    bounds = [10 * 10 ** (i / 10) for i in range(0, 51)]  # 10 us .. 1000 s
    out: list[list[float]] = []
    lo = 0
    for b in bounds:
        hi = bisect.bisect_right(sorted_ns, int(b * 1000))
        if hi > lo:
            out.append([round(b, 1), hi - lo])
        lo = hi
    if lo < len(sorted_ns):
        out.append([float("inf"), len(sorted_ns) - lo])
    return out


# ---- the client fleet ---------------------------------------------------------------------


class Member:
    """One client socket in one room."""

    __slots__ = ("fleet", "room", "index", "transport", "joined", "received", "last_seq", "disorder")

    def __init__(self, fleet: Fleet, room: str, index: int) -> None:
        self.fleet = fleet
        self.room = room
        self.index = index
        self.transport: Any = None
        self.joined: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.received = 0
        self.last_seq = 0
        self.disorder = 0


class Fleet:
    """rooms x members picows client sockets in this process, and what they received."""

    def __init__(self, urls: list[str], rooms: int, members: int, prefix: str) -> None:
        # Member i of each room connects to urls[i % len(urls)]; member 0 (the
        # sender where there is one) is on urls[0].
        self.urls = urls
        self.room_ids = [f"{prefix}-{i}" for i in range(rooms)]
        self.members_per_room = members
        self.members: list[Member] = []
        # Delivery latency: the sample is now - t0 where t0 is the event's t_ns,
        # or (e2e) the send time of its client_msg_id.
        self.deliveries = Series("deliveries")
        self.acks = Series("acks")
        # e2e breakdown by the chat service's `ts` (wall clock, ms resolution):
        # send -> stored by chat, stored -> member.
        self.to_store = Series("send->stored")
        self.from_store = Series("stored->member")
        self.sent_at: dict[str, int] = {}
        self.sent_wall: dict[str, int] = {}
        self.measure_from = 0  # message index: below it, warm-up
        self.index_of: Callable[[str], int] = lambda cmid: int(cmid[2:])
        self.errors: list[str] = []
        self.acked = 0

    def on_frame(self, member: Member, now: int, payload: bytes) -> None:
        frame = _decode_frame(payload)
        kind = frame.type
        if kind == "message":
            data = frame.data
            assert data is not None
            member.received += 1
            if data.seq != member.last_seq + 1 and member.last_seq:
                member.disorder += 1
            member.last_seq = data.seq
            cmid = data.client_msg_id
            if data.t_ns:
                t0 = data.t_ns
            else:
                t0 = self.sent_at.get(cmid, 0)
            if t0 and self.index_of(cmid) >= self.measure_from:
                self.deliveries.add(t0, now - t0)
                wall = self.sent_wall.get(cmid)
                if wall is not None and data.ts:
                    stored = data.ts * NS_PER_MS
                    if member.index % self.members_per_room == 0:  # once per message
                        self.to_store.add(t0, stored - wall)
                    self.from_store.add(t0, time.time_ns() - stored)
        elif kind == "ack":
            self.acked += 1
            t0 = self.sent_at.get(frame.client_msg_id, 0)
            if t0 and self.index_of(frame.client_msg_id) >= self.measure_from:
                self.acks.add(t0, now - t0)
        elif kind == "joined":
            if not member.joined.done():
                member.joined.set_result(frame.seq)
        elif kind == "error":
            self.errors.append(f"{frame.code}: {frame.message}")

    async def connect(self, concurrency: int = 64) -> None:
        import picows

        text = picows.WSMsgType.TEXT
        fleet = self

        class Listener(picows.WSListener):
            __slots__ = ("member",)

            def __init__(self, member: Member) -> None:
                super().__init__()
                self.member = member

            def on_ws_connected(self, transport: picows.WSTransport) -> None:
                self.member.transport = transport

            def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
                now = time.monotonic_ns()
                if frame.msg_type == text:
                    try:
                        fleet.on_frame(self.member, now, frame.get_payload_as_bytes())
                    except Exception as exc:  # a bad frame is a finding, not a crash of the bench
                        fleet.errors.append(f"client: {exc!r}")

        gate = asyncio.Semaphore(concurrency)

        async def one(room: str, i: int, n: int) -> None:
            member = Member(self, room, n)
            self.members.append(member)
            url = self.urls[i % len(self.urls)]
            async with gate:
                await picows.ws_connect(lambda: Listener(member), f"{url}?user=bench-{n}", websocket_handshake_timeout=30)
                member.transport.send(text, json.dumps({"type": "join", "room": room}).encode())
                await asyncio.wait_for(member.joined, 60)

        n = 0
        jobs = []
        for room in self.room_ids:
            for i in range(self.members_per_room):
                jobs.append(one(room, i, n))
                n += 1
        await asyncio.gather(*jobs)

    def senders(self) -> dict[str, Member]:
        """The first member of each room."""
        out: dict[str, Member] = {}
        for m in self.members:
            out.setdefault(m.room, m)
        return out

    def totals(self) -> tuple[int, int]:
        return sum(m.received for m in self.members), sum(m.disorder for m in self.members)

    async def wait_received(self, expected: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.totals()[0] < expected:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    def poster(self, prefix: str, stamp_wall: bool = False) -> Callable[[str, int, int], None]:
        """post(room, seq, index): message.send of message `index` (client_msg_id PREFIX-index) from
        the room's first member, timed from just before the write; stamp_wall: the wall clock too
        (for the breakdown by the stored event's ts)."""
        senders = self.senders()
        text = _text_type()

        def post(room: str, seq: int, index: int) -> None:
            cmid = f"{prefix}-{index}"
            frame = b'{"type":"message.send","room":"%s","body":"%s","client_msg_id":"%s"}' % (
                room.encode(), _BODY.encode(), cmid.encode(),
            )
            if stamp_wall:
                self.sent_wall[cmid] = time.time_ns()
            self.sent_at[cmid] = time.monotonic_ns()
            senders[room].transport.send(text, frame)

        return post

    def close(self) -> None:
        for m in self.members:
            if m.transport is not None:
                m.transport.disconnect()


async def _release(fleet: Fleet | None) -> None:
    """The end of a hop: this process back on every core, the client sockets closed."""
    unpin()
    if fleet is not None:
        fleet.close()
        await asyncio.sleep(0.1)


# ---- pacing ---------------------------------------------------------------------------------


async def paced(total: int, rate: float, send: Callable[[int], object]) -> dict[str, float]:
    """Call send(i) for i in 0..total-1 at `rate` per second on the loop clock.

    libuv timers tick in ms, so each tick sends every message that is due.
    Returns how late sends were against the schedule (a sign the client side
    could not keep up; the delivery latency is timed from the actual send).
    """
    start = time.monotonic_ns()
    period = 1e9 / rate
    lags: list[int] = []
    i = 0
    while i < total:
        now = time.monotonic_ns()
        due = min(total, int((now - start) / period) + 1)
        while i < due:
            lags.append(now - int(start + i * period))
            result = send(i)
            if asyncio.iscoroutine(result):
                await result
            i += 1
        await asyncio.sleep(0.001)  # libuv timers have 1 ms resolution; less would spin
    lags.sort()
    return {
        "schedule_lag_p50_ms": lags[len(lags) // 2] / NS_PER_MS,
        "schedule_lag_p99_ms": lags[int(len(lags) * 0.99)] / NS_PER_MS,
        "achieved_rate_per_s": total / ((time.monotonic_ns() - start) / 1e9),
    }


# ---- the Redis publisher ---------------------------------------------------------------------


class _RedisPublisher(asyncio.Protocol):
    """PUBLISH over a raw connection: the timestamp is taken just before the write."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.replies = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.replies += data.count(b"\r\n")

    def publish(self, channel: bytes, payload: bytes) -> None:
        assert self.transport is not None
        self.transport.write(
            b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(channel), channel, len(payload), payload)
        )


_BODY = "x" * 60


def _event(room: str, seq: int, index: int, t_ns: int) -> bytes:
    return (
        b'{"id":"bench-%d","room":"%s","seq":%d,"user":"bench","body":"%s","client_msg_id":"b-%d","ts":%d,"t_ns":%d}'
        % (index, room.encode(), seq, _BODY.encode(), index, time.time_ns() // NS_PER_MS, t_ns)
    )


# ---- runs ---------------------------------------------------------------------------------------


@dataclass
class Options:
    rooms: int
    members: int
    rate: float
    duration_s: float
    warmup_s: float
    pin: bool
    fetch_max_wait_ms: int | None
    produce_linger_ms: int | None
    partitions: int
    gateways: int
    smoke: bool
    drain_timeout_s: float = 20.0
    profile_dir: str = ""
    bench_linger_ms: int = 0  # the bench's own producer on message.created (kafka hop)
    chat_linger_ms: int | None = None  # the chat service's producer, when it differs from produce_linger_ms
    broker: str = "tansu"  # tansu or kafka (Apache Kafka); the services run its client profile


def _pin_gateways(pids: Sequence[int], opts: Options) -> None:
    if opts.pin:
        for pid in pids:
            pin_threads(pid, 0)
        pin(0, 1)


async def _drive(
    fleet: Fleet,
    opts: Options,
    send: Callable[[str, int, int], object],
    expect_per_message: int,
    procs: dict[str, int],
) -> dict[str, Any]:
    """Probe every room, then the paced run; returns counts and pacing figures.

    send(room, seq, index) posts message `index` (seq within its room).
    """
    rooms = fleet.room_ids
    seqs = dict.fromkeys(rooms, 0)
    index = 0
    probe_deadline_s = 60.0
    # 1. one probe per room, every member must get it (joins, subscriptions, group assignment)
    for room in rooms:
        seqs[room] += 1
        result = send(room, seqs[room], index)
        if asyncio.iscoroutine(result):
            await result
        index += 1
    probes = index
    fleet.measure_from = 1 << 62
    if not await fleet.wait_received(probes * expect_per_message, probe_deadline_s):
        got = fleet.totals()[0]
        raise RuntimeError(f"probe messages not delivered in {probe_deadline_s:.0f} s ({got} of {probes * expect_per_message})")
    # 2. the paced run; the first warmup_s are not counted
    warm = int(opts.warmup_s * opts.rate)
    total = warm + int(opts.duration_s * opts.rate)
    fleet.measure_from = probes + warm
    base = index

    def one(i: int) -> object:
        room = rooms[i % len(rooms)]
        seqs[room] += 1
        return send(room, seqs[room], base + i)

    meter = CpuMeter(procs)
    spies = _start_profilers(procs, opts, total / opts.rate)
    pacing = await paced(total, opts.rate, one)
    cpu = meter.stop()
    profiles = await _finish_profilers(spies)
    sent = probes + total
    expected = sent * expect_per_message
    complete = await fleet.wait_received(expected, opts.drain_timeout_s)
    received, disorder = fleet.totals()
    return {
        **_counts(fleet, sent, total - warm, expected, received, disorder, complete),
        **pacing,
        **cpu,
        "profiles": profiles,
    }


def _start_profilers(procs: dict[str, int], opts: Options, duration_s: float) -> list[tuple[str, Path, subprocess.Popen[bytes]]]:
    """py-spy record (raw collapsed stacks) of the gateway and chat processes for the run."""
    if not opts.profile_dir:
        return []
    out_dir = Path(opts.profile_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spies = []
    for name, pid in procs.items():
        if not (name.startswith("gateway") or name == "chat"):
            continue
        path = out_dir / f"{name}-{pid}.txt"
        spies.append((name, path, py_spy_record(pid, path, duration_s, 250, ["--nonblocking"])))
    return spies


async def _finish_profilers(spies: list[tuple[str, Path, subprocess.Popen[bytes]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, path, proc in spies:
        await asyncio.to_thread(wait_py_spy, proc, 30)
        if path.exists():
            counts = ProfileCounts(path)
            out[name] = {"file": str(path), "top_self": counts.top(counts.own, 12)}
    return out


async def run_redis_hop(opts: Options, work: Path) -> list[dict[str, Any]]:
    from roomcast.devstack import start_gateway
    from roomcast.embedded import start_redis

    logs: list[str] = []
    redis = start_redis(log_path=work / "redis.log")
    gateway = None
    fleet = None
    try:
        gateway = start_gateway(f"redis://{redis.address}", "", "", logs)
        _pin_gateways([gateway.proc.pid], opts)
        fleet = Fleet([f"ws://127.0.0.1:{gateway.port}/ws"], opts.rooms, opts.members, "rh")
        await fleet.connect()
        loop = asyncio.get_running_loop()
        transport, pub = await loop.create_connection(_RedisPublisher, redis.host, redis.port)
        from roomcast.wire.events import room_channel

        channels = {room: room_channel(room).encode() for room in fleet.room_ids}

        def send(room: str, seq: int, index: int) -> None:
            t = time.monotonic_ns()
            pub.publish(channels[room], _event(room, seq, index, t))

        counts = await _drive(fleet, opts, send, opts.members, {"gateway": gateway.proc.pid, "redis": redis.proc.pid})
        transport.close()
        row = _row("redis publish->client", opts, fleet.deliveries, counts)
        row["setup"] = "raw RESP PUBLISH from the client process; 1 gateway worker, no Kafka, no history"
        return [row]
    finally:
        await _release(fleet)
        if gateway is not None:
            gateway.stop(timeout_s=20)
        redis.stop()


def _gateway_flags(opts: Options) -> list[str]:
    flags = ["--kafka-profile", opts.broker]
    if opts.fetch_max_wait_ms is not None:
        flags += ["--fetch-max-wait-ms", str(opts.fetch_max_wait_ms)]
    if opts.produce_linger_ms is not None:
        flags += ["--produce-linger-ms", str(opts.produce_linger_ms)]
    return flags


def _kafka_settings(opts: Options) -> dict[str, Any]:
    from roomcast.config import BROKER_PROFILES, ChatConfig, GatewayConfig

    profile = BROKER_PROFILES[opts.broker]
    fetch_wait = opts.fetch_max_wait_ms or profile.fetch_max_wait_ms
    return {
        "broker": opts.broker,
        "idempotent_producers": profile.idempotent_producer,
        "gateway_fetch_max_wait_ms": fetch_wait,
        "gateway_produce_linger_ms": opts.produce_linger_ms if opts.produce_linger_ms is not None else GatewayConfig.produce_linger_ms,
        "chat_fetch_max_wait_ms": fetch_wait,
        "chat_produce_linger_ms": next(
            v for v in (opts.chat_linger_ms, opts.produce_linger_ms, ChatConfig.produce_linger_ms) if v is not None
        ),
        "bench_producer_linger_ms": opts.bench_linger_ms,
        "partitions": opts.partitions,
    }


async def run_kafka_hop(opts: Options, work: Path) -> list[dict[str, Any]]:
    from aiokafka import AIOKafkaProducer

    from roomcast.devstack import start_broker, start_gateway
    from roomcast.embedded import start_redis
    from roomcast.kafka import ensure_topics
    from roomcast.wire.events import CREATED_TOPIC

    logs: list[str] = []
    redis = start_redis(log_path=work / "redis.log")
    kafka = start_broker(opts.broker, log_path=work / "kafka.log")
    gateway = None
    fleet = None
    producer = None
    rows = []
    try:
        await ensure_topics(kafka.address, opts.partitions)
        gateway = start_gateway(f"redis://{redis.address}", kafka.address, "", logs, 0, *_gateway_flags(opts))
        producer = AIOKafkaProducer(bootstrap_servers=kafka.address, acks=1, linger_ms=opts.bench_linger_ms, enable_idempotence=False)
        await producer.start()
        _pin_gateways([gateway.proc.pid], opts)
        settings = _kafka_settings(opts)

        # (1) produce on message.created -> client
        fleet = Fleet([f"ws://127.0.0.1:{gateway.port}/ws"], opts.rooms, opts.members, "kh")
        await fleet.connect()
        keys = {room: room.encode() for room in fleet.room_ids}

        async def produce(room: str, seq: int, index: int) -> None:
            t = time.monotonic_ns()
            await producer.send(CREATED_TOPIC, _event(room, seq, index, t), key=keys[room])

        procs = {"gateway": gateway.proc.pid, "redis": redis.proc.pid, "tansu": kafka.proc.pid}
        counts = await _drive(fleet, opts, produce, opts.members, procs)
        row = _row("kafka produce->client", opts, fleet.deliveries, counts)
        row["setup"] = f"aiokafka producer (acks=1, linger {opts.bench_linger_ms} ms) in the client process -> message.created -> 1 gateway worker"
        row["kafka"] = settings
        rows.append(row)
        fleet.close()

        # (2) message.send -> ack: one sender per room (default rate limits hold at 10/s each)
        fleet = Fleet([f"ws://127.0.0.1:{gateway.port}/ws"], opts.rooms, 1, "ka")
        await fleet.connect()
        ack_opts = Options(**{**opts.__dict__, "members": 1})
        post = fleet.poster("a")
        before = fleet.acked
        counts = await _drive_acks(fleet, ack_opts, post, procs)
        row = _row("kafka send->ack", ack_opts, fleet.acks, counts)
        row["setup"] = "message.send from 1 socket per room -> gateway produce to message.ingest (acks=all) -> ack; no chat"
        row["kafka"] = settings
        row["acks_received"] = fleet.acked - before
        rows.append(row)
        return rows
    finally:
        await _release(fleet)
        if producer is not None:
            await producer.stop()
        if gateway is not None:
            gateway.stop(timeout_s=30)
        kafka.stop()
        redis.stop()


def _text_type() -> Any:
    import picows

    return picows.WSMsgType.TEXT


async def _drive_acks(
    fleet: Fleet, opts: Options, post: Callable[[str, int, int], None], procs: dict[str, int]
) -> dict[str, Any]:
    """The paced run for send->ack: counts acks instead of deliveries."""
    rooms = fleet.room_ids
    warm = int(opts.warmup_s * opts.rate)
    total = warm + int(opts.duration_s * opts.rate)
    fleet.measure_from = warm
    start_acks = fleet.acked

    def one(i: int) -> None:
        post(rooms[i % len(rooms)], 0, i)

    meter = CpuMeter(procs)
    pacing = await paced(total, opts.rate, one)
    cpu = meter.stop()
    deadline = time.monotonic() + opts.drain_timeout_s
    while fleet.acked - start_acks < total and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    got = fleet.acked - start_acks
    return {**_counts(fleet, total, total - warm, total, got, 0, got >= total), **pacing, **cpu}


def _counts(
    fleet: Fleet, sent: int, measured: int, expected: int, received: int, out_of_order: int, complete: bool
) -> dict[str, Any]:
    """The loss and order figures of one paced run (deliveries, or acks)."""
    return {
        "sent": sent,
        "measured_messages": measured,
        "deliveries_expected": expected,
        "deliveries_received": received,
        "lost": max(0, expected - received),
        "extra": max(0, received - expected),
        "out_of_order": out_of_order,
        "complete": complete,
        "client_errors": fleet.errors[:10],
    }


async def run_e2e_hop(opts: Options, work: Path) -> list[dict[str, Any]]:
    from roomcast.devstack import start_stack

    env_set = {}
    if opts.fetch_max_wait_ms is not None:
        env_set["ROOMCAST_FETCH_MAX_WAIT_MS"] = str(opts.fetch_max_wait_ms)
    if opts.produce_linger_ms is not None:
        env_set["ROOMCAST_PRODUCE_LINGER_MS"] = str(opts.produce_linger_ms)
    saved = {k: os.environ.get(k) for k in env_set}
    os.environ.update(env_set)
    try:
        chat_args = ["--produce-linger-ms", str(opts.chat_linger_ms)] if opts.chat_linger_ms is not None else []
        stack = await asyncio.to_thread(start_stack, work, opts.gateways, opts.partitions, chat_args, (), opts.broker)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    fleet = None
    try:
        _pin_gateways([g.proc.pid for g in stack.gateways], opts)
        # Members of a room spread over the gateways (member i on gateway i % n), so
        # the path includes the Redis hop between gateways.
        fleet = Fleet([stack.ws_url(i) for i in range(len(stack.gateways))], opts.rooms, opts.members, "e2e")
        await fleet.connect()
        post = fleet.poster("e", stamp_wall=True)
        procs = stack.pids()
        counts = await _drive(fleet, opts, post, opts.members, procs)
        rows = []
        row = _row("e2e send->members", opts, fleet.deliveries, counts)
        row["setup"] = (
            f"roomcast.devstack start_stack: Redis, Tansu ({opts.partitions} partitions), chat (SQLite), "
            f"{len(stack.gateways)} gateway worker(s) with history; members spread over the gateways; sender = member 0"
        )
        row["kafka"] = _kafka_settings(opts)
        rows.append(row)
        acks_lost = max(0, counts["sent"] - fleet.acked)
        ack = _row("e2e send->ack", opts, fleet.acks, {**counts, "lost": acks_lost, "extra": 0, "out_of_order": 0, "profiles": {}})
        ack["acks_received"] = fleet.acked
        ack["setup"] = "the same run: message.send -> ack on the sender"
        rows.append(ack)
        for series, what in ((fleet.to_store, "e2e send->stored"), (fleet.from_store, "e2e stored->members")):
            part = _row(what, opts, series, {**counts, "lost": 0, "extra": 0, "out_of_order": 0, "profiles": {}})
            part["setup"] = "breakdown by the event's ts (chat's wall clock at store, ms resolution: +-1 ms)"
            rows.append(part)
        return rows
    finally:
        await _release(fleet)
        await asyncio.to_thread(stack.stop)


def _row(hop: str, opts: Options, series: Series, counts: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {
        "hop": hop,
        "rate_per_s": opts.rate,
        "rooms": opts.rooms,
        "members": opts.members,
        "duration_s": opts.duration_s,
        "warmup_s": opts.warmup_s,
        **counts,
        **series.summary(),
    }
    verdicts = {}
    for key, (op, limit) in BUDGETS.get(hop, {}).items():
        value = row[f"{key}_ms"]
        ok = value <= limit if op == "<=" else value < limit
        verdicts[key] = {"op": op, "limit_ms": limit, "value_ms": value, "ok": ok}
    row["budget"] = verdicts
    row["budget_ok"] = all(v["ok"] for v in verdicts.values())
    row["lossless"] = row["lost"] == 0 and row["extra"] == 0 and row["out_of_order"] == 0 and not row["client_errors"]
    return row


# ---- report ---------------------------------------------------------------------------------------


def _table(rows: list[dict[str, Any]]) -> str:
    head = f"{'hop':<24} {'rate/s':>7} {'msgs':>6} {'deliv':>7} {'lost':>5} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'p99.9':>7} {'max ms':>7}  budget"
    lines = [head, "-" * len(head)]
    for r in rows:
        budget = ", ".join(
            f"{k}{v['op']}{v['limit_ms']:g} {'ok' if v['ok'] else 'MISSED'}" for k, v in r["budget"].items()
        ) or "-"
        lines.append(
            f"{r['hop']:<24} {r['rate_per_s']:>7.0f} {r['measured_messages']:>6} {r['samples']:>7} {r['lost']:>5} "
            f"{r['p50_ms']:>7.3f} {r['p90_ms']:>7.3f} {r['p99_ms']:>7.3f} {r['p99_9_ms']:>7.3f} {r['max_ms']:>7.2f}  {budget}"
        )
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    facts = machine_facts()
    return {**facts, "nproc": facts["cores"], "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}


HOPS: dict[str, Callable[[Options, Path], Awaitable[list[dict[str, Any]]]]] = {
    "redis": run_redis_hop,
    "kafka": run_kafka_hop,
    "e2e": run_e2e_hop,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.hops",
        description="Hop latency benchmarks (Redis, Kafka, end to end) on real processes at fixed rates.",
        epilog="Wrap in `flock /tmp/roomcast-bench.lock` on a shared machine. Exit 1 on any loss or a missed budget (--smoke: a gross breach, 10x the budget).",
    )
    p.add_argument("--hops", default="redis,kafka,e2e", help="comma-separated: redis, kafka, e2e (default: all)")
    p.add_argument("--smoke", action="store_true", help="a few seconds per hop at a small size; fail only on loss")
    p.add_argument("--rooms", type=int, default=None, help="rooms (default 100; smoke 20)")
    p.add_argument("--members", type=int, default=None, help="member sockets per room (default 10; smoke 5)")
    p.add_argument("--rate", type=float, default=None, help="messages per second, all rooms together (default 1000; smoke 200)")
    p.add_argument("--duration", type=float, default=None, help="measured seconds per hop (default 20; smoke 2)")
    p.add_argument("--warmup", type=float, default=None, help="seconds sent first and not counted (default 3; smoke 1)")
    p.add_argument("--fetch-max-wait-ms", type=int, default=None, help="Kafka consumer fetch wait of gateway and chat (default: the broker profile's: kafka 500, tansu 10)")
    p.add_argument("--broker", choices=("tansu", "kafka"), default="tansu", help="the broker: tansu (embedded) or kafka (Apache Kafka, needs a JDK and Maven)")
    p.add_argument("--produce-linger-ms", type=int, default=None, help="Kafka producer linger of gateway and chat (default: theirs, 2 and 0)")
    p.add_argument("--chat-linger-ms", type=int, default=None, help="Kafka producer linger of the chat service alone, in the e2e hop (default: --produce-linger-ms, else its own 0)")
    p.add_argument("--bench-linger-ms", type=int, default=0, help="linger of the bench's own producer on message.created in the kafka hop (default 0)")
    p.add_argument("--partitions", type=int, default=4, help="partitions of each topic (default 4)")
    p.add_argument("--gateways", type=int, default=1, help="gateway processes in the e2e hop (default 1)")
    p.add_argument("--no-pin", action="store_true", help="do not pin the gateway to CPU 0 and the clients to CPU 1")
    p.add_argument("--out", default="reports/hops.json", help="JSON results (default reports/hops.json)")
    p.add_argument("--profile", metavar="DIR", default="", help="py-spy record the gateway and chat processes during each measured phase into DIR (raw collapsed stacks)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    smoke = args.smoke

    def pick(value: Any, full: Any, small: Any) -> Any:
        return value if value is not None else (small if smoke else full)

    can_pin = hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2 and not args.no_pin
    opts = Options(
        rooms=pick(args.rooms, 100, 20),
        members=pick(args.members, 10, 5),
        rate=pick(args.rate, 1000.0, 200.0),
        duration_s=pick(args.duration, 20.0, 2.0),
        warmup_s=pick(args.warmup, 3.0, 1.0),
        pin=can_pin,
        fetch_max_wait_ms=args.fetch_max_wait_ms,
        produce_linger_ms=args.produce_linger_ms,
        partitions=args.partitions,
        gateways=args.gateways,
        smoke=smoke,
        drain_timeout_s=20.0,
        profile_dir=args.profile,
        bench_linger_ms=args.bench_linger_ms,
        chat_linger_ms=args.chat_linger_ms,
        broker=args.broker,
    )
    hops = [h.strip() for h in args.hops.split(",") if h.strip()]
    unknown = [h for h in hops if h not in HOPS]
    if unknown:
        print(f"bench.hops: unknown hop(s) {', '.join(unknown)}; use redis, kafka, e2e", file=sys.stderr)
        return 2
    raise_fd_limit(65536)
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    started = time.monotonic()
    import uvloop

    for hop in hops:
        with tempfile.TemporaryDirectory(prefix=f"bench-hops-{hop}-") as tmp:
            t0 = time.monotonic()
            try:
                got = uvloop.run(HOPS[hop](opts, Path(tmp)))
            except Exception as exc:
                failures.append(f"{hop}: {exc!r}")
                print(f"bench.hops: {hop} hop failed: {exc!r}", file=sys.stderr)
                continue
            for row in got:
                row["wall_s"] = round(time.monotonic() - t0, 1)
            rows.extend(got)
            print(_table(got), flush=True)
            print(flush=True)
    print(
        f"== bench.hops {'(smoke) ' if smoke else ''}{opts.rooms} rooms x {opts.members} members, "
        f"{opts.rate:g} msgs/s, {opts.duration_s:g} s measured after {opts.warmup_s:g} s warm-up; "
        f"pinned: {'gateway CPU 0, clients CPU 1' if opts.pin else 'no'}; {time.monotonic() - started:.0f} s =="
    )
    print(_table(rows))
    for r in rows:
        if "kafka" in r:
            k = r["kafka"]
            print(
                f"  {r['hop']}: broker {k['broker']}; fetch wait gateway {k['gateway_fetch_max_wait_ms']} ms / chat {k['chat_fetch_max_wait_ms']} ms; "
                f"linger gateway {k['gateway_produce_linger_ms']} ms / chat {k['chat_produce_linger_ms']} ms / bench producer {k['bench_producer_linger_ms']} ms; "
                f"{k['partitions']} partitions"
            )
        print(
            f"  {r['hop']}: sent {r['sent']}, deliveries {r['deliveries_received']}/{r['deliveries_expected']}, "
            f"out of order {r['out_of_order']}, schedule lag p99 {r['schedule_lag_p99_ms']:.2f} ms, "
            f"achieved {r['achieved_rate_per_s']:.0f}/s"
        )
        drift = " ".join(f"{w['p50_ms']:.1f}/{w['p99_ms']:.1f}" for w in r["windows_5s"])
        print(f"    p50/p99 ms by 5 s window of the run: {drift}")
        cores = ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_cores"].items())
        print(f"    CPU (cores) during the run: {cores}; rest of the machine {r['others_cores']:.2f}")
        for name, prof in r.get("profiles", {}).items():
            top = "; ".join(f"{fn} {share:.0%}" for fn, share in prof["top_self"][:8])
            print(f"    py-spy {name} ({prof['file']}), self time: {top}")
    for r in rows:
        if not r["lossless"]:
            failures.append(
                f"{r['hop']}: lost {r['lost']}, extra {r['extra']}, out of order {r['out_of_order']}, errors {r['client_errors']}"
            )
        for key, v in r["budget"].items():
            missed = over_budget(f"{r['hop']} {key}", v["value_ms"], v["limit_ms"], gross=smoke, strict=v["op"] == "<")
            if missed:
                failures.append(missed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"machine": _machine(), "options": opts.__dict__, "results": rows, "failures": failures},
            indent=2,
            default=str,
        )
    )
    print(f"results: {out}")
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("ok: nothing lost" + (f", no figure over {GROSS_BREACH_FACTOR:g}x its budget" if smoke else ", every budget met"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
