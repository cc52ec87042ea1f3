"""Micro benchmarks of the gateway's per-frame and per-socket hot paths.

    python -m pytest bench/test_micro.py --benchmark-only
    python -m pytest bench/test_micro.py --benchmark-only -k envelope   # one group

Groups (pytest-benchmark `group`), each comparing what the code does with the
alternatives it was chosen over:

- decode.<shape>: a client frame (PROTOCOL.md 2) parsed *and validated*:
  `decode_client_frame` (msgspec, typed) vs orjson.loads / json.loads followed
  by a hand validator that returns the same Structs and refuses the same
  frames (checked before timing).
- decode.event_seq: the one field the fan-out reads from a Redis payload.
- encode.event / encode.<server frame>: a MessageEvent and the server frames
  `joined`, `ack`, `error` with msgspec vs orjson vs json (compact).
- envelope.<n>: `frame_events` (n = 1 and 16 events, WebSocket header +
  envelope, PROTOCOL.md 4) vs bytes `+=`, bytearray and a join without the
  header helper.
- write: one 200-byte text frame to one real loopback TCP socket (a picows
  server connection on uvloop, drained by another process): the pre-framed
  `underlying_transport.write(frame)` the fan-out uses vs picows
  `WSTransport.send(TEXT, payload)` vs framing per socket and then writing.
  Timed per batch of 64 writes on an empty send buffer; divide by 64.

Benchmarks print figures; none of them asserts a speed. Each checks first
that its alternatives produce the same bytes or objects, so a faster variant
cannot win by doing less.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import orjson
import pytest

from roomcast.wire.codes import ErrorCode
from roomcast.wire.events import MessageEvent, decode_event_seq, encode_event
from roomcast.wire.frames import (
    MESSAGE_ENVELOPE_HEAD,
    MESSAGE_ENVELOPE_TAIL,
    ROOM_ID_PATTERN,
    FrameError,
    Join,
    Leave,
    Send,
    decode_client_frame,
    encode_ack,
    encode_error,
    encode_joined,
)

try:  # present since the room registry framed fan-out buffers
    from gateway.core.rooms import frame_events
except ImportError:  # pragma: no cover - an older revision under bench.compare
    frame_events = None  # type: ignore[assignment]

try:
    from gateway.core.server_frames import text_frame, text_frame_header
except ImportError:  # pragma: no cover - an older revision under bench.compare (the module was gateway.core.wsframe)
    try:
        from gateway.core.wsframe import text_frame, text_frame_header  # type: ignore[no-redef]
    except ImportError:
        text_frame = text_frame_header = None  # type: ignore[assignment]


# ---- inputs ------------------------------------------------------------------

CLIENT_FRAMES: dict[str, str] = {
    "join": '{"type":"join","room":"room-42"}',
    "join_since": '{"type":"join","room":"room-42","since":41}',
    "leave": '{"type":"leave","room":"room-42"}',
    "send": '{"type":"message.send","room":"room-42","body":"hello everyone, this is a typical chat line of some length","client_msg_id":"c-1732650000123-7"}',
}

EVENT = MessageEvent(
    id="01JD3Z5K8Q7M2V4X6Y8ZA0BCDE",
    room="room-42",
    seq=58,
    user="alice",
    body="hello everyone, this is a typical chat line of some length",
    client_msg_id="c-1732650000123-7",
    ts=1732650000123,
)
EVENT_DICT = msgspec.structs.asdict(EVENT)
EVENT_BYTES = encode_event(EVENT)


# ---- hand validators (the orjson / json side of the decode comparison) ----------

_room_re = re.compile(ROOM_ID_PATTERN)


def _bad(message: str) -> FrameError:
    return FrameError(ErrorCode.BAD_REQUEST, message)


def _room(obj: dict[str, Any]) -> str:
    room = obj.get("room")
    if type(room) is not str:
        raise _bad("missing or mistyped `room`")
    if _room_re.match(room) is None:
        raise _bad("room must be 1 to 128 characters of A-Z a-z 0-9 _ . : -")
    return room


def validate_frame(obj: Any) -> Join | Leave | Send:
    """The same checks as the msgspec schema in roomcast.wire.frames, by hand."""
    if type(obj) is not dict:
        raise _bad("frame must be a JSON object")
    kind = obj.get("type")
    if kind == "message.send":
        room = _room(obj)
        body = obj.get("body")
        if type(body) is not str:
            raise _bad("missing or mistyped `body`")
        cmid = obj.get("client_msg_id")
        if cmid is not None and (type(cmid) is not str or not 1 <= len(cmid) <= 64):
            raise _bad("client_msg_id must be 1 to 64 characters")
        return Send(room, body, cmid)
    if kind == "join":
        room = _room(obj)
        since = obj.get("since")
        if since is not None and (type(since) is not int or since < 0):
            raise _bad("since must be an integer >= 0")
        return Join(room, since)
    if kind == "leave":
        return Leave(_room(obj))
    if type(kind) is not str:
        raise _bad("frame has no `type`")
    raise _bad("unknown frame type; expected join, leave or message.send")


def decode_orjson(text: str) -> Join | Leave | Send:
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise _bad("frame is not valid JSON") from None
    return validate_frame(obj)


def decode_json(text: str) -> Join | Leave | Send:
    try:
        obj = json.loads(text)
    except ValueError:
        raise _bad("frame is not valid JSON") from None
    return validate_frame(obj)


DECODERS: dict[str, Callable[[str], Any]] = {
    "msgspec": decode_client_frame,
    "orjson": decode_orjson,
    "json": decode_json,
}

# Frames each decoder must refuse, so the hand validators are not cheaper by checking less.
REFUSED = [
    "[]",
    "not json",
    '{"room":"r1"}',
    '{"type":"join"}',
    '{"type":"join","room":"bad room"}',
    '{"type":"join","room":"r1","since":-1}',
    '{"type":"join","room":"r1","since":"4"}',
    '{"type":"message.send","room":"r1"}',
    '{"type":"message.send","room":"r1","body":5}',
    '{"type":"message.send","room":"r1","body":"x","client_msg_id":""}',
    '{"type":"nope","room":"r1"}',
]


@pytest.mark.parametrize("shape", list(CLIENT_FRAMES))
@pytest.mark.parametrize("lib", list(DECODERS))
def test_decode_client_frame(benchmark: Any, lib: str, shape: str) -> None:
    decode = DECODERS[lib]
    text = CLIENT_FRAMES[shape]
    assert decode(text) == decode_client_frame(text)
    for bad in REFUSED:
        with pytest.raises(FrameError):
            decode(bad)
    benchmark.group = f"decode.{shape}"
    benchmark(decode, text)


def _seq_orjson(payload: bytes) -> int:
    return orjson.loads(payload)["seq"]


def _seq_json(payload: bytes) -> int:
    return json.loads(payload)["seq"]


@pytest.mark.parametrize("lib", ["msgspec", "orjson", "json"])
def test_decode_event_seq(benchmark: Any, lib: str) -> None:
    fn = {"msgspec": decode_event_seq, "orjson": _seq_orjson, "json": _seq_json}[lib]
    assert fn(EVENT_BYTES) == 58
    benchmark.group = "decode.event_seq"
    benchmark(fn, EVENT_BYTES)


# ---- encoding ----------------------------------------------------------------------

_json_compact = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def _event_orjson() -> bytes:
    return orjson.dumps(EVENT_DICT)


def _event_json() -> bytes:
    return _json_compact(EVENT_DICT).encode()


@pytest.mark.parametrize("lib", ["msgspec", "orjson", "json"])
def test_encode_event(benchmark: Any, lib: str) -> None:
    fn = {"msgspec": lambda: encode_event(EVENT), "orjson": _event_orjson, "json": _event_json}[lib]
    assert fn() == EVENT_BYTES
    benchmark.group = "encode.event"
    benchmark(fn)


SERVER_FRAMES: dict[str, dict[str, Callable[[], bytes]]] = {
    "joined": {
        "msgspec": lambda: encode_joined("room-42", 57),
        "orjson": lambda: orjson.dumps({"type": "joined", "room": "room-42", "seq": 57}),
        "json": lambda: _json_compact({"type": "joined", "room": "room-42", "seq": 57}).encode(),
    },
    "ack": {
        "msgspec": lambda: encode_ack("c-1732650000123-7"),
        "orjson": lambda: orjson.dumps({"type": "ack", "client_msg_id": "c-1732650000123-7"}),
        "json": lambda: _json_compact({"type": "ack", "client_msg_id": "c-1732650000123-7"}).encode(),
    },
    "error": {
        "msgspec": lambda: encode_error(ErrorCode.RATE_LIMITED, "too many messages; slow down", "c-7"),
        "orjson": lambda: orjson.dumps(
            {"type": "error", "code": ErrorCode.RATE_LIMITED.value, "message": "too many messages; slow down", "ref": "c-7"}
        ),
        "json": lambda: _json_compact(
            {"type": "error", "code": ErrorCode.RATE_LIMITED.value, "message": "too many messages; slow down", "ref": "c-7"}
        ).encode(),
    },
}


@pytest.mark.parametrize("frame", list(SERVER_FRAMES))
@pytest.mark.parametrize("lib", ["msgspec", "orjson", "json"])
def test_encode_server_frame(benchmark: Any, lib: str, frame: str) -> None:
    fns = SERVER_FRAMES[frame]
    fn = fns[lib]
    assert json.loads(fn()) == json.loads(fns["msgspec"]())
    benchmark.group = f"encode.{frame}"
    benchmark(fn)


# ---- the fan-out envelope -----------------------------------------------------------

_HEAD = MESSAGE_ENVELOPE_HEAD
_TAIL = MESSAGE_ENVELOPE_TAIL
_OVERHEAD = len(_HEAD) + len(_TAIL)


def _header(n: int) -> bytes:
    # RFC 6455 5.2, FIN + text, unmasked; the same as gateway.core.server_frames.text_frame_header
    if n < 126:
        return bytes((0x81, n))
    if n < 65536:
        return b"\x81\x7e" + n.to_bytes(2, "big")
    return b"\x81\x7f" + n.to_bytes(8, "big")


def envelope_concat(payloads: list[bytes]) -> bytes:
    out = b""
    for p in payloads:
        out += _header(len(p) + _OVERHEAD) + _HEAD + p + _TAIL
    return out


def envelope_bytearray(payloads: list[bytes]) -> bytes:
    out = bytearray()
    for p in payloads:
        out += _header(len(p) + _OVERHEAD)
        out += _HEAD
        out += p
        out += _TAIL
    return bytes(out)  # shared by every socket of the room: must be immutable


def envelope_join_inline(payloads: list[bytes]) -> bytes:
    parts = []
    for p in payloads:
        parts += (_header(len(p) + _OVERHEAD), _HEAD, p, _TAIL)
    return b"".join(parts)


ENVELOPES: dict[str, Callable[[list[bytes]], bytes]] = {
    "concat": envelope_concat,
    "bytearray": envelope_bytearray,
    "join_inline": envelope_join_inline,
}
if frame_events is not None:
    ENVELOPES = {"frame_events": frame_events, **ENVELOPES}


def _payloads(n: int) -> list[bytes]:
    return [encode_event(msgspec.structs.replace(EVENT, seq=58 + i)) for i in range(n)]


@pytest.mark.parametrize("count", [1, 16])
@pytest.mark.parametrize("impl", list(ENVELOPES))
def test_envelope(benchmark: Any, impl: str, count: int) -> None:
    payloads = _payloads(count)
    fn = ENVELOPES[impl]
    expected = envelope_concat(payloads)
    assert fn(payloads) == expected
    benchmark.group = f"envelope.{count}"
    benchmark(fn, payloads)


# ---- the per-socket write -------------------------------------------------------------

WRITES_PER_ROUND = 64
# 196 bytes of payload + a 4-byte header (payloads of 126+ bytes carry a 16-bit length) = 200 bytes on the wire.
_SHORT = msgspec.structs.replace(EVENT, body="")
_BODY_LEN = 196 - len(MESSAGE_ENVELOPE_HEAD + encode_event(_SHORT) + MESSAGE_ENVELOPE_TAIL)
WRITE_PAYLOAD = MESSAGE_ENVELOPE_HEAD + encode_event(msgspec.structs.replace(EVENT, body="x" * _BODY_LEN)) + MESSAGE_ENVELOPE_TAIL
assert len(WRITE_PAYLOAD) == 196

# A raw-socket WebSocket client in its own process: upgrades, then reads and
# discards everything, so the kernel send buffer of the server socket keeps
# emptying while the benchmark writes (the benchmark's own loop does not run
# during a timed round).
_DRAINER = r"""
import base64, os, socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
key = base64.b64encode(os.urandom(16)).decode()
s.sendall(("GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           "Sec-WebSocket-Key: " + key + "\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
buf = b""
while b"\r\n\r\n" not in buf:
    chunk = s.recv(4096)
    if not chunk:
        sys.exit(1)
    buf += chunk
print("upgraded", flush=True)
while s.recv(1 << 20):
    pass
"""


class _Server:
    """A picows server with one connection from the drainer process."""

    def __init__(self) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        self.transport: Any = None
        self.drainer: subprocess.Popen[bytes] | None = None
        self.server: Any = None

    def start(self) -> None:
        import picows

        outer = self

        class Listener(picows.WSListener):
            def on_ws_connected(self, transport: picows.WSTransport) -> None:
                outer.transport = transport

            def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
                pass

        async def serve() -> int:
            self.server = await picows.ws_create_server(lambda request: Listener(), "127.0.0.1", 0)
            return int(self.server.sockets[0].getsockname()[1])

        port = self.loop.run_until_complete(serve())
        cmd = [sys.executable, "-c", _DRAINER, str(port)]
        if _can_pin():
            cmd = ["taskset", "-c", "1", *cmd]
        self.drainer = subprocess.Popen(cmd, stdout=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while self.transport is None:
            if time.monotonic() > deadline:
                raise RuntimeError("the drainer process did not connect")
            self.loop.run_until_complete(asyncio.sleep(0.01))
        assert self.drainer.stdout is not None
        self.drainer.stdout.readline()

    def settle(self) -> None:
        """Run the loop until the transport's buffer and the kernel's send queue
        are empty (outside the timing), so every round starts alike."""
        underlying = self.transport.underlying_transport
        fd = underlying.get_extra_info("socket").fileno()
        deadline = time.monotonic() + 5
        while underlying.get_write_buffer_size() or _unsent(fd):
            if time.monotonic() > deadline:
                raise RuntimeError("the drainer process stopped reading")
            self.loop.run_until_complete(asyncio.sleep(0))

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.disconnect()
        if self.server is not None:
            self.server.close()
        self.loop.run_until_complete(asyncio.sleep(0.05))
        if self.drainer is not None:
            try:
                self.drainer.wait(5)
            except subprocess.TimeoutExpired:
                self.drainer.kill()
                self.drainer.wait()
            if self.drainer.stdout is not None:
                self.drainer.stdout.close()
        self.loop.close()


def _unsent(fd: int) -> int:
    """Bytes in the kernel's send queue of a TCP socket (SIOCOUTQ, Linux)."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def _can_pin() -> bool:
    return hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2 and os.path.exists("/usr/bin/taskset")


@pytest.fixture(scope="module")
def ws_server() -> Iterator[_Server]:
    server = _Server()
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("how", ["transport_write", "ws_send", "frame_then_write"])
def test_socket_write(benchmark: Any, ws_server: _Server, how: str) -> None:
    import picows

    frame = _header(len(WRITE_PAYLOAD)) + WRITE_PAYLOAD
    assert len(frame) == 200
    payload = WRITE_PAYLOAD
    ws = ws_server.transport
    write = ws.underlying_transport.write
    send = ws.send
    text = picows.WSMsgType.TEXT
    n = WRITES_PER_ROUND

    if how == "transport_write":
        def batch() -> None:
            for _ in range(n):
                write(frame)
    elif how == "ws_send":
        def batch() -> None:
            for _ in range(n):
                send(text, payload)
    else:
        make = text_frame if text_frame is not None else (lambda p: _header(len(p)) + p)

        def batch() -> None:
            for _ in range(n):
                write(make(payload))

    benchmark.group = f"write.200B x{n}"
    benchmark.extra_info["writes_per_round"] = n
    benchmark.pedantic(batch, setup=ws_server.settle, rounds=2000, warmup_rounds=50)
    ws_server.settle()
