"""Locust load test of the roomcast WebSocket protocol (docs/PROTOCOL.md).

Run it through `python loadtest/run.py` (starts `roomcast dev`, runs locust
headless with CSV and HTML reports, stops the stack), or by hand against a
running gateway:

    locust -f loadtest/locustfile.py --headless -u 75 -r 75 -t 30s \\
        --host ws://127.0.0.1:8080/ws ChattyUser BroadcastUser IdleUser ChurnUser

Scenarios (user classes; how many of each: --chatty-users etc.):

- ChattyUser: rooms of --chatty-room-size members; every member posts one
  message every --chatty-interval seconds.
- BroadcastUser: one large room; the first --broadcast-senders users post
  every --broadcast-interval seconds, everyone else listens.
- IdleUser: connects, joins one room, sends nothing (holds a connection; the
  socket is still read, so pings get their pongs).
- ChurnUser: joins and leaves rooms in a loop, and reconnects every few rounds.

Metrics, besides locust's own (all request_type "WS"):

- `message.send->ack`: from sending message.send to its ack.
- `send->receive`: from a post to its arrival at each member of the room,
  by the sender's wall clock carried in the body (one machine, so one clock).
- `join->joined`, `leave->left`, `connect`: churn and connection set-up.
- failures: `error:<code>` frames, a seq that is not last+1 on a socket
  (PROTOCOL.md 3: in order, exactly once), an unexpected close, a post not
  acked in --ack-timeout seconds, a post that did not come back to its
  sender (a member of the room) in --ack-timeout seconds: lost.

At the end (the `quitting` event) the budgets are checked and the exit code
set to 1 on a breach: p99 of send->receive under --p99-budget-ms (25), p99 of
message.send->ack under --ack-p99-budget-ms (20), at least one send->receive
sample, and a failure ratio of at most --max-fail-ratio (0).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from typing import Any

import gevent
import gevent.event
import websocket
from locust import User, between, constant, events, task
from locust.env import Environment

try:
    import orjson

    _loads = orjson.loads
except ImportError:  # pragma: no cover
    _loads = json.loads

log = logging.getLogger("roomcast.loadtest")

WS = "WS"
_ids = itertools.count()
_msg_ids = itertools.count()
_BODY_TAG = "lt:"


# ---- options ------------------------------------------------------------------------------


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    g = parser.add_argument_group("roomcast scenarios and budgets")
    g.add_argument("--chatty-users", type=int, default=20, help="ChattyUser count (fixed)")
    g.add_argument("--chatty-room-size", type=int, default=10, help="members per chatty room")
    g.add_argument("--chatty-interval", type=float, default=0.5, help="seconds between posts of each chatty user (rate limit: 20/s)")
    g.add_argument("--broadcast-users", type=int, default=30, help="BroadcastUser count (fixed), all in one room")
    g.add_argument("--broadcast-senders", type=int, default=1, help="broadcast users (per locust process) that post")
    g.add_argument("--broadcast-interval", type=float, default=0.2, help="seconds between posts of a broadcast sender")
    g.add_argument("--idle-users", type=int, default=20, help="IdleUser count (fixed)")
    g.add_argument("--churn-users", type=int, default=5, help="ChurnUser count (fixed)")
    g.add_argument("--run-id", default="", help="prefix of room ids, so runs against one stack do not mix")
    g.add_argument("--p99-budget-ms", type=float, default=25.0, help="budget: p99 send->receive (ms)")
    g.add_argument("--ack-p99-budget-ms", type=float, default=20.0, help="budget: p99 message.send->ack (ms); 0: not checked")
    g.add_argument("--max-fail-ratio", type=float, default=0.0, help="budget: failures / requests")
    g.add_argument("--ack-timeout", type=float, default=5.0, help="a post without an ack after this long is a failure (s)")


@events.init.add_listener
def _set_counts(environment: Environment, **kwargs: Any) -> None:
    opts = environment.parsed_options
    if opts is None:
        return
    ChattyUser.fixed_count = opts.chatty_users
    BroadcastUser.fixed_count = opts.broadcast_users
    IdleUser.fixed_count = opts.idle_users
    ChurnUser.fixed_count = opts.churn_users


def _fire(environment: Environment, name: str, ms: float, length: int = 0, exc: Exception | None = None) -> None:
    environment.events.request.fire(
        request_type=WS, name=name, response_time=ms, response_length=length, exception=exc, context={}
    )


class ProtocolError(Exception):
    pass


# ---- one connection ---------------------------------------------------------------------------


class Connection:
    """A websocket-client socket with a reader greenlet that turns frames into metrics."""

    def __init__(self, user: RoomcastUser) -> None:
        self.user = user
        self.env = user.environment
        self.ws: websocket.WebSocket | None = None
        self.reader: gevent.Greenlet | None = None
        self.closing = False
        self.pending_acks: dict[str, float] = {}
        # Own posts not yet seen come back: the poster is a member of the room,
        # so a post that never returns was lost (after an ack or not).
        self.awaiting_echo: dict[str, float] = {}
        self.waiting: dict[tuple[str, str], tuple[float, gevent.event.AsyncResult]] = {}
        self.last_seq: dict[str, int] = {}

    def open(self) -> None:
        url = f"{self.user.host}?user={self.user.user_name}"
        t0 = time.perf_counter()
        try:
            ws = websocket.create_connection(url, timeout=10, skip_utf8_validation=True, enable_multithread=True)
        except Exception as exc:
            _fire(self.env, "connect", (time.perf_counter() - t0) * 1000, exc=exc)
            raise
        ws.settimeout(None)
        _fire(self.env, "connect", (time.perf_counter() - t0) * 1000)
        self.ws = ws
        self.closing = False
        self.reader = gevent.spawn(self._read)

    def close(self) -> None:
        self.closing = True
        if self.ws is not None:
            try:
                self.ws.close(timeout=1)
            except Exception:
                pass
        if self.reader is not None:
            self.reader.kill(block=False)
        self.ws = None
        self.last_seq.clear()

    def send(self, frame: dict[str, Any]) -> None:
        assert self.ws is not None
        self.ws.send(json.dumps(frame, separators=(",", ":")))

    def request(self, frame: dict[str, Any], answer: str, metric: str, timeout: float = 10.0) -> dict[str, Any] | None:
        """Send a join/leave and wait for its answer frame; fire the metric."""
        key = (answer, frame["room"])
        result = gevent.event.AsyncResult()
        t0 = time.perf_counter()
        self.waiting[key] = (t0, result)
        self.send(frame)
        try:
            reply = result.get(timeout=timeout)
        except gevent.Timeout:
            self.waiting.pop(key, None)
            _fire(self.env, metric, timeout * 1000, exc=ProtocolError(f"no {answer} in {timeout:.0f} s"))
            return None
        _fire(self.env, metric, (time.perf_counter() - t0) * 1000)
        return reply

    def join(self, room: str) -> bool:
        return self.request({"type": "join", "room": room}, "joined", "join->joined") is not None

    def leave(self, room: str) -> None:
        self.last_seq.pop(room, None)
        self.request({"type": "leave", "room": room}, "left", "leave->left")

    def post(self, room: str) -> None:
        cmid = f"lt-{self.user.user_name}-{next(_msg_ids)}"
        self.pending_acks[cmid] = self.awaiting_echo[cmid] = time.perf_counter()
        self.send({"type": "message.send", "room": room, "body": f"{_BODY_TAG}{time.time_ns()}", "client_msg_id": cmid})

    def check_acks(self, timeout_s: float) -> None:
        now = time.perf_counter()
        for cmid, t0 in list(self.pending_acks.items()):
            if now - t0 > timeout_s:
                del self.pending_acks[cmid]
                self.awaiting_echo.pop(cmid, None)  # counted once, as no ack
                _fire(self.env, "message.send->ack", (now - t0) * 1000, exc=ProtocolError("no ack"))
        for cmid, t0 in list(self.awaiting_echo.items()):
            if now - t0 > timeout_s:
                del self.awaiting_echo[cmid]
                _fire(self.env, "send->receive", (now - t0) * 1000, exc=ProtocolError("acked post never delivered to its sender"))

    def _read(self) -> None:
        ws = self.ws
        assert ws is not None
        while not self.closing:
            try:
                raw = ws.recv()
            except Exception as exc:
                if not self.closing:
                    _fire(self.env, "connection", 0, exc=ProtocolError(f"socket closed: {exc!r}"))
                return
            if not raw:
                if not self.closing:
                    _fire(self.env, "connection", 0, exc=ProtocolError("socket closed by the server"))
                return
            try:
                self._on_frame(_loads(raw), len(raw))
            except Exception as exc:  # a malformed frame is a failure, not a crash of the reader
                _fire(self.env, "frame", 0, exc=ProtocolError(f"bad frame {raw[:100]!r}: {exc!r}"))

    def _on_frame(self, frame: dict[str, Any], length: int) -> None:
        kind = frame.get("type")
        if kind == "message":
            data = frame["data"]
            room, seq = data["room"], data["seq"]
            last = self.last_seq.get(room)
            if last is not None:
                if seq != last + 1:
                    _fire(self.env, "seq order", 0, exc=ProtocolError(f"room {room}: seq {seq} after {last}"))
                self.last_seq[room] = seq
            self.awaiting_echo.pop(data.get("client_msg_id", ""), None)
            body = data.get("body", "")
            if body.startswith(_BODY_TAG):
                sent_ns = int(body[len(_BODY_TAG):])
                _fire(self.env, "send->receive", (time.time_ns() - sent_ns) / 1e6, length)
        elif kind == "ack":
            t0 = self.pending_acks.pop(frame.get("client_msg_id", ""), None)
            if t0 is not None:
                _fire(self.env, "message.send->ack", (time.perf_counter() - t0) * 1000, length)
        elif kind in ("joined", "left"):
            room = frame.get("room", "")
            if kind == "joined":
                # Set here, in the reader, before any message that follows it is read.
                self.last_seq[room] = int(frame.get("seq", 0))
            waiter = self.waiting.pop((kind, room), None)
            if waiter is not None:
                waiter[1].set(frame)
        elif kind == "error":
            ref = frame.get("ref") or ""
            self.pending_acks.pop(ref, None)
            self.awaiting_echo.pop(ref, None)
            _fire(self.env, f"error:{frame.get('code')}", 0, exc=ProtocolError(f"{frame.get('message')} (ref {ref})"))


# ---- users --------------------------------------------------------------------------------


class RoomcastUser(User):
    abstract = True
    host = "ws://127.0.0.1:8080/ws"

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.index = next(_ids)
        self.user_name = f"lt{self.index}"
        self.conn = Connection(self)
        self.opts = environment.parsed_options

    def room_id(self, name: str) -> str:
        run = getattr(self.opts, "run_id", "") if self.opts is not None else ""
        return f"{run}-{name}" if run else name

    def on_start(self) -> None:
        self.conn.open()

    def on_stop(self) -> None:
        self.conn.check_acks(self._ack_timeout())  # younger ones are still in flight
        self.conn.close()

    def _ack_timeout(self) -> float:
        return float(getattr(self.opts, "ack_timeout", 5.0))


_chatty_ids = itertools.count()


class ChattyUser(RoomcastUser):
    """Rooms of --chatty-room-size; every member posts every --chatty-interval s."""

    def on_start(self) -> None:
        super().on_start()
        size = max(1, int(getattr(self.opts, "chatty_room_size", 10)))
        self.room = self.room_id(f"chatty-{next(_chatty_ids) // size}")
        self.interval = float(getattr(self.opts, "chatty_interval", 0.5))
        self.conn.join(self.room)

    def wait_time(self) -> float:
        return self.interval

    @task
    def post(self) -> None:
        self.conn.post(self.room)
        self.conn.check_acks(self._ack_timeout())


_broadcast_senders = itertools.count()


class BroadcastUser(RoomcastUser):
    """One large room: a few senders, everyone else listens."""

    def on_start(self) -> None:
        super().on_start()
        self.room = self.room_id("broadcast")
        self.sender = next(_broadcast_senders) < int(getattr(self.opts, "broadcast_senders", 1))
        self.interval = float(getattr(self.opts, "broadcast_interval", 0.2))
        self.conn.join(self.room)

    def wait_time(self) -> float:
        return self.interval if self.sender else 1.0

    @task
    def post(self) -> None:
        if self.sender:
            self.conn.post(self.room)
            self.conn.check_acks(self._ack_timeout())


class IdleUser(RoomcastUser):
    """Holds a connection in a quiet room."""

    wait_time = constant(5)

    def on_start(self) -> None:
        super().on_start()
        self.conn.join(self.room_id(f"idle-{self.index % 50}"))

    @task
    def idle(self) -> None:
        pass


class ChurnUser(RoomcastUser):
    """Join, stay a moment, leave; reconnect every fifth round."""

    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        super().on_start()
        self.rounds = 0

    @task
    def churn(self) -> None:
        self.rounds += 1
        room = self.room_id(f"churn-{self.rounds % 7}")
        if self.conn.join(room):
            gevent.sleep(0.05)
            self.conn.leave(room)
        if self.rounds % 5 == 0:
            self.conn.close()
            self.conn.open()


# ---- budgets ----------------------------------------------------------------------------------


@events.quitting.add_listener
def _check_budgets(environment: Environment, **kwargs: Any) -> None:
    opts = environment.parsed_options
    if opts is None or environment.stats is None:
        return
    stats = environment.stats
    breaches: list[str] = []
    lines: list[str] = []
    receive = stats.get("send->receive", WS)
    ack = stats.get("message.send->ack", WS)
    if receive.num_requests == 0:
        breaches.append("no send->receive samples: nothing was delivered")
    else:
        p99 = receive.get_response_time_percentile(0.99)
        lines.append(f"send->receive: {receive.num_requests} samples, p50 {receive.get_response_time_percentile(0.5):.0f} ms, p99 {p99:.0f} ms (budget < {opts.p99_budget_ms:g})")
        if p99 >= opts.p99_budget_ms:
            breaches.append(f"p99 send->receive {p99:.0f} ms >= {opts.p99_budget_ms:g} ms")
    if ack.num_requests:
        p99 = ack.get_response_time_percentile(0.99)
        lines.append(f"message.send->ack: {ack.num_requests} samples, p50 {ack.get_response_time_percentile(0.5):.0f} ms, p99 {p99:.0f} ms (budget < {opts.ack_p99_budget_ms:g})")
        if opts.ack_p99_budget_ms and p99 >= opts.ack_p99_budget_ms:
            breaches.append(f"p99 message.send->ack {p99:.0f} ms >= {opts.ack_p99_budget_ms:g} ms")
    total = stats.total
    ratio = total.fail_ratio
    lines.append(f"requests {total.num_requests}, failures {total.num_failures} (ratio {ratio:.4f}, budget <= {opts.max_fail_ratio:g})")
    if ratio > opts.max_fail_ratio:
        failures = sorted(stats.errors.values(), key=lambda e: -e.occurrences)[:5]
        breaches.append(f"failure ratio {ratio:.4f} > {opts.max_fail_ratio:g}: " + "; ".join(f"{e.name}: {e.error} x{e.occurrences}" for e in failures))
    for line in lines:
        log.info("budget check: %s", line)
    if breaches:
        for b in breaches:
            log.error("budget missed: %s", b)
        environment.process_exit_code = 1
    else:
        log.info("budget check: every budget met")
