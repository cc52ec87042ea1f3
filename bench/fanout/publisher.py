"""Publish ~200-byte message events into Redis `room:<id>` channels, as the chat
service would (PROTOCOL.md 4): seq 1, 2, 3 ... per room, plus fields the
gateway must pass through untouched (`pub_ns`, `extra`).

    python -m bench.fanout.publisher --redis-port RP --rooms R --room-prefix X
        --mode fixed --rate 1000 --duration 5
    python -m bench.fanout.publisher ... --mode max --duration 5
        --progress-file F --members S --window-per-conn 64

A raw socket with hand-built RESP commands (no client library on the hot
path): pipelined PUBLISH commands, the integer replies counted as they come
(a reply of 0 means no subscriber got that message; those are reported).

`pub_ns` is `time.monotonic_ns()` (CLOCK_MONOTONIC) taken when the tick's
commands are built, right before they are written: the load client subtracts
it from its own CLOCK_MONOTONIC at receipt.

fixed: messages go out round-robin over the rooms at `--rate` msgs/s in
  total, paced on a ~1 ms tick (each tick sends what is due, in one write).
max: as fast as the pipeline goes, bounded by a window: at most
  `window_per_conn * conns` deliveries are in flight (published * members -
  delivered, where delivered is read from the load client's progress file).
  Without the window a gateway slower than the publisher would build an
  unbounded backlog in Redis (and Redis cuts a pub/sub client 32 MB behind).
Both: a whole number of rounds (every room gets the same count), bounded by
`--duration` and `--max-messages`. Prints one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import socket
import struct
import sys
import time

__all__ = ["main", "make_event"]

_BODY_PAD = "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt"


def make_template(room: str, target_len: int = 200) -> bytes:
    """An event template with %d slots for seq, client_msg_id, ts, pub_ns; padded to ~target_len bytes."""
    base = (
        '{"id":"m-%%d","room":"%s","seq":%%d,"user":"bench-pub","body":"%s",'
        '"client_msg_id":"c-%%d","ts":%%d,"pub_ns":%%d,"extra":{"src":"bench","v":1}}'
    )
    sample = (base % (room, "") % (1, 1, 1, 1_732_650_000_123, 10**13)).encode()
    body_len = max(8, target_len - len(sample))
    body = (_BODY_PAD * 4)[:body_len]
    return (base % (room, body)).encode()


def make_event(room: str, seq: int, pub_ns: int, ts_ms: int = 1_732_650_000_123) -> bytes:
    return make_template(room) % (seq, seq, seq, ts_ms, pub_ns)


class Publisher:
    def __init__(self, host: str, port: int, rooms: list[str]) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rooms = rooms
        self.channels = [f"room:{r}".encode() for r in rooms]
        # The RESP command up to the payload's length, per room.
        self.heads = [b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n" % (len(c), c) for c in self.channels]
        self.templates = [make_template(r) for r in rooms]
        self.seq = [0] * len(rooms)
        self.next_room = 0
        self.published = 0
        self.replies = 0
        self.zero_receivers = 0
        self.errors = 0
        self.event_bytes = len(make_event(rooms[0], 1, 10**13))
        self._tail = b""

    def build(self, count: int, pub_ns: int) -> bytes:
        """The next `count` PUBLISH commands, round-robin over the rooms."""
        parts = []
        append = parts.append
        ts_ms = time.time_ns() // 1_000_000
        heads, templates, seqs = self.heads, self.templates, self.seq
        nrooms = len(self.rooms)
        r = self.next_room
        for _ in range(count):
            s = seqs[r] + 1
            seqs[r] = s
            payload = templates[r] % (s, s, s, ts_ms, pub_ns)
            append(heads[r])
            append(b"$%d\r\n" % len(payload))
            append(payload)
            append(b"\r\n")
            r += 1
            if r == nrooms:
                r = 0
        self.next_room = r
        self.published += count
        return b"".join(parts)

    def read_replies(self, block: bool) -> None:
        """Consume the integer replies available now (all outstanding ones if block)."""
        sock = self.sock
        while self.replies < self.published:
            try:
                data = sock.recv(1 << 20, 0 if block else socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            if not data:
                raise ConnectionError("redis closed the connection")
            data = self._tail + data
            lines = data.split(b"\r\n")
            self._tail = lines.pop()
            for line in lines:
                if line == b":0":
                    self.zero_receivers += 1
                elif line[:1] == b"-":
                    self.errors += 1
            self.replies += len(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.read_replies(block=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--redis-host", default="127.0.0.1")
    p.add_argument("--redis-port", type=int, required=True)
    p.add_argument("--rooms", type=int, required=True, help="room count R; rooms are <prefix>0 .. <prefix>R-1")
    p.add_argument("--room-prefix", default="r")
    p.add_argument("--mode", choices=("fixed", "max"), default="fixed")
    p.add_argument("--rate", type=float, default=1000.0, help="fixed mode: messages/s in total over all rooms")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of publishing (upper bound)")
    p.add_argument("--max-messages", type=int, default=50_000_000, help="upper bound on messages in total")
    p.add_argument("--members", type=int, default=1, help="max mode: sockets per room S (for the in-flight window)")
    p.add_argument("--progress-file", help="max mode: the load client's progress file (delivered count)")
    p.add_argument("--window-per-conn", type=int, default=64, help="max mode: deliveries in flight per connection")
    p.add_argument(
        "--max-inflight-msgs", type=int, default=30_000,
        help="max mode: messages in flight at most (~8 MB: under Redis' pubsub output buffer soft limit)",
    )
    p.add_argument("--batch", type=int, default=2000, help="max mode: messages per pipelined write (upper bound)")
    args = p.parse_args(argv)

    rooms = [f"{args.room_prefix}{i}" for i in range(args.rooms)]
    pub = Publisher(args.redis_host, args.redis_port, rooms)
    nrooms = len(rooms)
    conns = nrooms * args.members
    max_rounds = max(1, args.max_messages // nrooms)
    t0 = time.monotonic_ns()
    deadline = t0 + int(args.duration * 1e9)
    window_waits = 0

    if args.mode == "fixed":
        total = max(nrooms, int(args.rate * args.duration) // nrooms * nrooms)
        total = min(total, max_rounds * nrooms)
        interval_ns = 1e9 / args.rate
        while pub.published < total:
            now = time.monotonic_ns()
            due = min(total, int((now - t0) / interval_ns) + 1)
            if due > pub.published:
                pub.send(pub.build(due - pub.published, time.monotonic_ns()))
            # Sleep to the next message's due time (at most 1 ms: keeps the tick fine).
            next_due = t0 + int(pub.published * interval_ns)
            wait = (next_due - time.monotonic_ns()) / 1e9
            if wait > 0:
                time.sleep(min(wait, 0.001))
    else:
        if not args.progress_file:
            p.error("--mode max needs --progress-file (the window needs the delivered count)")
        fd = os.open(args.progress_file, os.O_RDONLY)
        mm = mmap.mmap(fd, 8, prot=mmap.PROT_READ)
        unpack = struct.Struct("Q").unpack_from
        window = min(args.window_per_conn * conns, args.max_inflight_msgs * args.members)
        members = args.members
        # Whole rounds per write; at least one round even if a round exceeds the batch.
        rounds_per_batch = max(1, args.batch // nrooms)
        rounds = 0
        while rounds < max_rounds and time.monotonic_ns() < deadline:
            delivered = unpack(mm, 0)[0]
            in_flight = pub.published * members - delivered
            room_for = (window - in_flight) // (nrooms * members)
            if room_for <= 0:
                window_waits += 1
                pub.read_replies(block=False)
                time.sleep(0.0002)
                continue
            n = min(room_for, rounds_per_batch, max_rounds - rounds)
            pub.send(pub.build(n * nrooms, time.monotonic_ns()))
            rounds += n
        mm.close()
        os.close(fd)
    t_end = time.monotonic_ns()
    pub.read_replies(block=True)
    per_room = pub.published // nrooms
    wall = (t_end - t0) / 1e9
    print(
        json.dumps(
            {
                "published": pub.published,
                "per_room": per_room,
                "rooms": nrooms,
                "event_bytes": pub.event_bytes,
                "t_first_pub_ns": t0,
                "t_end_pub_ns": t_end,
                "publish_s": round(wall, 4),
                "published_per_s": round(pub.published / wall, 1) if wall > 0 else None,
                "zero_receivers": pub.zero_receivers,
                "redis_errors": pub.errors,
                "window_waits": window_waits,
                "cpu_s": round(time.process_time(), 3),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
