"""Fuzz target: the WebSocket message layer (gateway.core.framing.MessageAssembler).

picows hands the layer raw frames (``gateway/adapters/framed.py`` only
forwards them), so the input is a script of frames: byte 0 picks the
message limit (0-510 bytes, small so it is hit), then per frame one header
byte laid out as on the wire (FIN, RSV1-3, 4-bit opcode), one length byte and
that many payload bytes.

Properties, on every input:

- ``feed`` never raises and returns only None or a documented outcome;
- the outcome is the one a small reference model of RFC 6455 predicts
  (reserved bits and opcodes, fragmentation, control frames, close codes,
  the size limit, UTF-8 validity failing at the first bad fragment);
- a delivered message is at most the limit and is exactly its fragments'
  bytes; a ``Fail`` has a 1002/1007/1009 code and a short ASCII reason;
- once it returned ``Fail`` or ``PeerClose`` it returns None for good;
- re-framing a delivered message in other fragments gives it back;
- each frame, written out as a masked client frame, has the wire size
  ``frame_extent`` (the read splitter's header walk) says, -1 exactly for
  the headers picows refuses, and None while the header is incomplete.
"""

from __future__ import annotations

from gateway.core.framing import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    BinaryMessage,
    Fail,
    MessageAssembler,
    Outcome,
    PeerClose,
    SendPong,
    TextMessage,
    frame_extent,
    is_valid_close_code,
)
from tests.fuzz.common import FuzzBytes

# Second bytes that start each valid UTF-8 range (E0 A0, ED 80, F0 90, F4 80)
# and a plain continuation byte: enough to tell whether a tail can be completed.
_COMPLETION_BYTES = (0x80, 0x90, 0xA0)


def check(data: bytes) -> None:
    src = FuzzBytes(data)
    limit = src.u8() * 2
    assembler = MessageAssembler(limit)
    model = _Model(limit)
    while src.remaining:
        head = src.u8()
        fin, rsv1, rsv2, rsv3 = bool(head & 0x80), bool(head & 0x40), bool(head & 0x20), bool(head & 0x10)
        opcode = head & 0x0F
        payload = src.take(src.u8())
        _check_wire_extent(head, payload)
        was_closed = model.closed
        expected = model.feed(opcode, fin, rsv1 or rsv2 or rsv3, payload)
        outcome = assembler.feed(opcode, fin, rsv1, rsv2, rsv3, payload)
        if was_closed:
            assert outcome is None, f"frame handled after the close: {outcome!r}"
        _check_outcome(outcome, limit)
        if isinstance(expected, Fail):
            # Reasons are free text: compare the code.
            assert isinstance(outcome, Fail) and outcome.code == expected.code, (
                f"expected a {expected.code} failure ({expected.reason}) for opcode {opcode:#x} fin={fin}, got {outcome!r}"
            )
        else:
            assert outcome == expected, f"opcode {opcode:#x} fin={fin} payload={payload!r}: expected {expected!r}, got {outcome!r}"
        assert assembler.closed == model.closed
        if isinstance(outcome, (TextMessage, BinaryMessage)):
            _check_reframing(outcome, limit, src.u8())


def _check_outcome(outcome: object, limit: int) -> None:
    if outcome is None:
        return
    if isinstance(outcome, TextMessage):
        assert type(outcome.text) is str and len(outcome.text.encode()) <= limit, f"over the {limit}-byte limit: {outcome!r}"
    elif isinstance(outcome, BinaryMessage):
        assert type(outcome.data) is bytes and len(outcome.data) <= limit, f"over the {limit}-byte limit: {outcome!r}"
    elif isinstance(outcome, SendPong):
        assert len(outcome.payload) <= 125, outcome
    elif isinstance(outcome, Fail):
        assert outcome.code in (1002, 1007, 1009), outcome
        assert outcome.reason.isascii() and 0 < len(outcome.reason) <= 123, outcome
    elif isinstance(outcome, PeerClose):
        assert is_valid_close_code(outcome.code), outcome
        assert len(outcome.reason.encode()) <= 123, outcome
    else:
        raise AssertionError(f"undocumented outcome {outcome!r}")


def _check_wire_extent(head: int, payload: bytes) -> None:
    size = len(payload)
    length_field = bytes((0x80 | size,)) if size < 126 else bytes((0x80 | 126,)) + size.to_bytes(2, "big")
    header = bytes((head,)) + length_field + b"\x01\x02\x03\x04"  # mask bit set, then the mask key
    wire = b"junk" + header + payload
    opcode = head & 0x0F
    refused = opcode not in (OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG) or (
        opcode >= OP_CLOSE and (not head & 0x80 or size > 125)
    )
    extent = frame_extent(wire, 4, len(wire))
    assert extent == (-1 if refused else len(header) + size), f"header byte {head:#x}, {size}-byte payload: extent {extent}"
    for end in range(4, 4 + len(header) - 4):  # the header without its mask key
        extent = frame_extent(wire, 4, end)
        expected = -1 if refused and end - 4 >= 2 else None
        assert extent == expected, f"header byte {head:#x}, {size}-byte payload, first {end - 4} bytes: extent {extent}"


def _check_reframing(message: TextMessage | BinaryMessage, limit: int, cut: int) -> None:
    # Split the message's bytes every `step` bytes (anywhere, even inside a
    # UTF-8 sequence) and feed the pieces to a fresh assembler, a ping between
    # fragments (RFC 6455 5.4 allows it): the same message must come out.
    opcode, data = (OP_TEXT, message.text.encode()) if isinstance(message, TextMessage) else (OP_BINARY, message.data)
    step = cut % 7 + 1
    pieces = [data[i : i + step] for i in range(0, len(data), step)] or [b""]
    fresh = MessageAssembler(limit)
    for index, piece in enumerate(pieces):
        last = index == len(pieces) - 1
        outcome = fresh.feed(opcode if index == 0 else OP_CONTINUATION, last, False, False, False, piece)
        if last:
            assert outcome == message, f"re-framed in {step}-byte pieces: {outcome!r} != {message!r}"
        else:
            assert outcome is None, f"fragment {index} of a re-framed message gave {outcome!r}"
            assert fresh.feed(OP_PING, True, False, False, False, b"p") == SendPong(b"p")


class _Model:
    """RFC 6455 sections 5.2-5.5, 7.4 and 8.1 as plainly as they read."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.closed = False
        self.opcode = 0  # of the open fragmented message, 0 if none
        self.parts: list[bytes] = []

    def feed(self, opcode: int, fin: bool, rsv: bool, payload: bytes) -> Outcome | None:
        if self.closed:
            return None
        if rsv:
            return self._fail(1002, "rsv")
        if opcode in (OP_CLOSE, OP_PING, OP_PONG):
            if not fin or len(payload) > 125:
                return self._fail(1002, "bad control frame")
            if opcode == OP_PING:
                return SendPong(payload)
            if opcode == OP_PONG:
                return None
            return self._close(payload)
        if opcode == OP_CONTINUATION:
            if not self.opcode:
                return self._fail(1002, "continuation of nothing")
        elif opcode in (OP_TEXT, OP_BINARY):
            if self.opcode:
                return self._fail(1002, "interleaved message")
            self.opcode = opcode
            self.parts = []
        else:
            return self._fail(1002, "reserved opcode")
        self.parts.append(payload)
        data = b"".join(self.parts)
        if len(data) > self.limit:
            return self._fail(1009, "too big")
        if self.opcode == OP_TEXT and not (_is_utf8(data) if fin else _is_utf8_prefix(data)):
            return self._fail(1007, "bad utf-8")
        if not fin:
            return None
        message_opcode, self.opcode = self.opcode, 0
        return TextMessage(data.decode()) if message_opcode == OP_TEXT else BinaryMessage(data)

    def _close(self, payload: bytes) -> Outcome:
        if not payload:
            self.closed = True
            return PeerClose(1000, "")
        code = int.from_bytes(payload[:2], "big")
        if len(payload) == 1 or not is_valid_close_code(code):
            return self._fail(1002, "bad close")
        if not _is_utf8(payload[2:]):
            return self._fail(1007, "bad close reason")
        self.closed = True
        return PeerClose(code, payload[2:].decode())

    def _fail(self, code: int, reason: str) -> Fail:
        self.closed = True
        return Fail(code, reason)


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def _is_utf8_prefix(data: bytes) -> bool:
    # True if some bytes appended to data make it valid UTF-8: a sequence
    # lacks at most 3 bytes.
    return any(_is_utf8(data + completion) for count in range(4) for completion in _completions(count))


def _completions(count: int) -> list[bytes]:
    if count == 0:
        return [b""]
    return [bytes((first,)) + rest for first in _COMPLETION_BYTES for rest in _completions(count - 1)]
