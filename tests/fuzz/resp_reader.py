"""Fuzz target: the Redis subscriber's RESP reader (gateway.adapters.resp_push.PushReader,
which ``_SubscriberProtocol.buffer_updated`` in gateway/adapters/redis_sub.py
calls with each socket read).

Byte 0 picks the mode and the hiredis feed slice (1-64 bytes, so slices cut
replies everywhere), byte 1 how the stream is cut into reads.

- Even byte 0: the rest of the input is a script of replies a subscriber
  may see (messages, confirmations, pongs, error replies, and replies of the
  wrong shape); the harness encodes them as RESP2 (the subscriber never sends
  HELLO 3, so RESP3 push frames only occur in the other mode) and knows what
  must come out.
- Odd byte 0: the rest of the input is the stream itself, any bytes.

Properties:

- ``read`` never raises; channels, payloads and confirmations are bytes;
- the stream read in arbitrary chunks and slices gives the same messages
  (per channel, in order), confirmations, pongs, errors and malformed
  count as the stream read in one piece, and both agree on a protocol error;
- after a protocol error every later read is empty and says so;
- for a scripted stream: exactly the scripted messages etc. come out, every
  wrong-shaped reply is counted as malformed, and there is no protocol error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.adapters.resp_push import PushRead, PushReader
from tests.fuzz.common import FuzzBytes

_CHANNELS = (b"room:a", b"room:b", b"roomcast:control", b"")


@dataclass
class _Total:
    """Reads of one stream, merged."""

    messages: dict[bytes, list[bytes]] = field(default_factory=dict)
    confirmed: list[bytes] = field(default_factory=list)
    pongs: int = 0
    errors: list[str] = field(default_factory=list)
    malformed: int = 0
    protocol_error: bool = False

    def add(self, read: PushRead) -> None:
        assert not self.protocol_error or (read == PushRead(protocol_error=read.protocol_error) and read.protocol_error), (
            f"read after a protocol error gave {read!r}"
        )
        for channel, payloads in read.messages.items():
            assert type(channel) is bytes and payloads and all(type(p) is bytes for p in payloads), read
            self.messages.setdefault(channel, []).extend(payloads)
        assert all(type(c) is bytes for c in read.confirmed) and all(type(e) is str for e in read.errors), read
        self.confirmed += read.confirmed
        self.pongs += read.pongs
        self.errors += read.errors
        self.malformed += read.malformed
        if read.protocol_error is not None:
            assert isinstance(read.protocol_error, str) and read.protocol_error, read
            self.protocol_error = True


def check(data: bytes) -> None:
    src = FuzzBytes(data)
    mode = src.u8()
    cut = src.u8()
    expected: _Total | None = None
    if mode % 2 == 0:
        expected = _Total()
        stream = _script(src, expected)
    else:
        stream = src.rest()
    whole = _read_all(PushReader(), [stream])
    chunked = _read_all(PushReader(feed_bytes=mode // 4 + 1), _chunks(stream, cut))
    assert chunked == whole, f"chunked reads differ from one read:\n{chunked}\n{whole}"
    if expected is not None:
        assert whole == expected, f"scripted stream read wrong:\n got {whole}\nwant {expected}"


def _read_all(reader: PushReader, chunks: list[bytes]) -> _Total:
    total = _Total()
    for chunk in chunks:
        # The socket writes into a reused bytearray bigger than the read.
        buffer = bytearray(chunk) + b"\xff" * 3
        total.add(reader.read(buffer, len(chunk)))
    if total.protocol_error:
        total.add(reader.read(bytearray(b"*1\r\n$4\r\nPING\r\n"), 14))
    return total


def _chunks(stream: bytes, cut: int) -> list[bytes]:
    chunks = []
    pos = 0
    step = cut
    while pos < len(stream):
        size = step % 23 + 1 if cut else len(stream)
        chunks.append(stream[pos : pos + size])
        pos += size
        step = step * 5 + 3
    return chunks


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _array(*items: bytes) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(items)


def _script(src: FuzzBytes, expected: _Total) -> bytes:
    out = []
    while src.remaining:
        op = src.u8()
        channel = _CHANNELS[(op >> 4) % len(_CHANNELS)]
        kind = op % 12
        if kind in (0, 1):
            name = (b"message", b"smessage")[kind]
            payload = src.take(src.u8())
            out.append(_array(_bulk(name), _bulk(channel), _bulk(payload)))
            expected.messages.setdefault(channel, []).append(payload)
        elif kind == 2:
            out.append(_array(_bulk(b"subscribe"), _bulk(channel), b":1\r\n"))
            expected.confirmed.append(channel)
        elif kind == 3:
            out.append(_array(_bulk(b"unsubscribe"), _bulk(channel), b":0\r\n"))
        elif kind == 4:
            out.append(_array(_bulk(b"pong"), _bulk(b"")))
            expected.pongs += 1
        elif kind == 5:
            out.append(b"+PONG\r\n")
            expected.pongs += 1
        elif kind == 6:
            error = b"MOVED %d 10.0.0.1:6379" % src.u16()
            out.append(b"-" + error + b"\r\n")
            expected.errors.append(error.decode())
        elif kind == 7:
            # An empty array has no kind: ignored like any reply of an unknown kind.
            out.append(_array())
        elif kind == 8:
            out.append(_array(_bulk(b"message"), _bulk(channel)))  # no payload
            expected.malformed += 1
        elif kind == 9:
            out.append(_array(_bulk(b"message"), b":7\r\n", _bulk(b"x")))  # channel not a string
            expected.malformed += 1
        elif kind == 10:
            out.append(_array(_bulk(b"smessage"), b"%1\r\n+k\r\n+v\r\n", _bulk(b"x")))  # RESP3 map channel
            expected.malformed += 1
        else:
            out.append(_array(_bulk(b"subscribe"), b"$-1\r\n", b":1\r\n"))  # null channel
            expected.malformed += 1
    return b"".join(out)
