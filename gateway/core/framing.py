"""WebSocket message layer over raw frames (RFC 6455), sans-I/O.

picows parses frame headers and unmasks payloads, then hands every frame to
the application as is. Everything RFC 6455 asks of an endpoint above that is
here: reassembling fragmented messages, UTF-8 validation of text, reserved
bits, control-frame rules and close-frame rules.

One :class:`MessageAssembler` per connection. Feed it every received frame,
in order, with :meth:`MessageAssembler.feed`; act on what it returns. It does
no I/O, reads no clock and imports no event loop, so it is tested without a
socket (``tests/unit/test_framing.py``) and could sit under any frame parser.

Opcodes are plain ints (RFC 6455 section 5.2) so that callers convert their
library's enum once per frame and the hot path compares small ints.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Final

__all__ = [
    "OP_CONTINUATION",
    "OP_TEXT",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "CLOSE_NORMAL",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_INVALID_DATA",
    "CLOSE_MESSAGE_TOO_BIG",
    "MAX_CONTROL_PAYLOAD_BYTES",
    "MessageAssembler",
    "Outcome",
    "TextMessage",
    "BinaryMessage",
    "SendPong",
    "Fail",
    "PeerClose",
    "is_valid_close_code",
    "frame_extent",
]

# RFC 6455 section 5.2 / 11.8: opcodes.
OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

# RFC 6455 section 7.4.1: the close codes this layer sends.
CLOSE_NORMAL: Final = 1000
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_INVALID_DATA: Final = 1007
CLOSE_MESSAGE_TOO_BIG: Final = 1009

# RFC 6455 section 5.5: control frames carry at most 125 payload bytes.
MAX_CONTROL_PAYLOAD_BYTES: Final = 125

# RFC 6455 section 7.4.1 defines 1000-1003 and 1007-1011; IANA's registry
# (section 11.7) added 1012-1014. 1004, 1005, 1006 and 1015 are reserved and
# MUST NOT appear on the wire (1005/1006/1015 mean "no frame", "no close",
# "TLS failure" locally). 1016-2999 are reserved for future RFCs; 3000-4999
# are for libraries and applications (section 7.4.2).
_VALID_LOW_CLOSE_CODES: Final = frozenset(
    (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014)
)

_new_utf8_decoder = codecs.getincrementaldecoder("utf-8")

# RFC 6455 5.2: the defined opcodes; frame parsers (picows) refuse the others.
_DEFINED_OPCODES: Final = frozenset((OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG))


def is_valid_close_code(code: int) -> bool:
    """True if ``code`` may be sent in a close frame (RFC 6455 section 7.4)."""
    return code in _VALID_LOW_CLOSE_CODES or 3000 <= code <= 4999


@dataclass(frozen=True, slots=True)
class TextMessage:
    """A complete text message whose payload was valid UTF-8."""

    text: str


@dataclass(frozen=True, slots=True)
class BinaryMessage:
    """A complete binary message."""

    data: bytes


@dataclass(frozen=True, slots=True)
class SendPong:
    """The peer pinged: send a pong carrying ``payload`` (RFC 6455 5.5.3)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Fail:
    """The peer broke the protocol: send a close frame with ``code`` and
    ``reason``, then drop the connection (RFC 6455 section 7.1.7).

    ``code`` is 1002 (protocol error), 1007 (invalid UTF-8) or 1009 (message
    over ``max_message_bytes``). ``reason`` is short, lowercase, ASCII and
    under 123 bytes, so it fits a close frame.
    """

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class PeerClose:
    """The peer sent a valid close frame: send a close frame back with
    ``code`` and ``reason``, then drop the connection (RFC 6455 5.5.1).

    ``code`` is the peer's code, or 1000 when the peer's close frame had no
    payload (section 7.1.5 calls that "1005, no status", a code that must not
    be sent back). ``reason`` is the peer's reason, "" if none.
    """

    code: int
    reason: str


Outcome = TextMessage | BinaryMessage | SendPong | Fail | PeerClose

_new_object = object.__new__
# The slot's own setter: bypasses the frozen __setattr__, for the hot path.
_set_text = TextMessage.__dict__["text"].__set__


class MessageAssembler:
    """Turns one connection's frames into messages, pongs to send, or a close.

    Create one per connection with the largest message to accept, in bytes
    (for text, UTF-8 bytes, counted across all fragments). Call :meth:`feed`
    with each frame in the order received. After it returns :class:`Fail` or
    :class:`PeerClose` the connection is closing: every later frame is
    ignored (``feed`` returns None), so the caller needs no state of its own.

    ``feed`` raises nothing on any input: every protocol error is a
    :class:`Fail` value.
    """

    __slots__ = ("_max", "_fast_limit", "_closed", "_msg_opcode", "_texts", "_chunks", "_size", "_decoder")

    def __init__(self, max_message_bytes: int) -> None:
        if max_message_bytes < 0:
            raise ValueError(f"max_message_bytes must be >= 0, got {max_message_bytes}")
        self._max = max_message_bytes
        # The hot path's one state check: max_message_bytes while no
        # fragmented message is open and the connection is not closing, -1
        # otherwise, so "payload fits" also means "state allows it".
        self._fast_limit = max_message_bytes
        self._closed = False
        # OP_TEXT or OP_BINARY while a fragmented message is open, else 0.
        self._msg_opcode = 0
        # Decoded fragments of an open text message, raw ones of a binary one.
        self._texts: list[str] = []
        self._chunks: list[bytes] = []
        self._size = 0
        self._decoder: codecs.IncrementalDecoder | None = None

    @property
    def max_message_bytes(self) -> int:
        """The largest message accepted, in bytes; 1009 above it."""
        return self._max

    @property
    def closed(self) -> bool:
        """True once a :class:`Fail` or :class:`PeerClose` was returned, or
        :meth:`close` was called; frames are ignored from then on."""
        return self._closed

    def close(self) -> None:
        """Ignore every frame from now on.

        Call when the application closes the connection itself (a 1003 for a
        binary frame, 1012 on drain): frames still in flight must not be
        delivered as messages after the close frame is sent (RFC 6455 5.5.1).
        """
        self._closed = True
        self._fast_limit = -1
        self._reset_message()

    def feed(self, opcode: int, fin: bool, rsv1: bool, rsv2: bool, rsv3: bool, payload: bytes) -> Outcome | None:
        """Take one received frame; return what to do, or None for nothing yet.

        ``opcode`` is the frame's 4-bit opcode as an int, ``fin`` and the
        ``rsv`` flags its header bits, ``payload`` its unmasked payload.
        None means a fragment was buffered, a pong arrived, or the connection
        is already closing.
        """
        # Hot path: a whole text message in one frame, no extension bits, no
        # fragmented message open, within the limit. One branch, one decode.
        # Cost of this call for a 200-byte text frame (2-core AMD EPYC VM,
        # CPython 3.11.7; best of 7, machine shared, so +-15%):
        #   python -m timeit -s "from gateway.core.framing import
        #   MessageAssembler; f = MessageAssembler(65536).feed;
        #   p = b'x' * 200" "f(1, True, False, False, False, p)"
        # -> 230-280 ns, of which bytes.decode is 51 ns.
        if opcode == OP_TEXT and fin and len(payload) <= self._fast_limit and not (rsv1 or rsv2 or rsv3):
            try:
                text = payload.decode()
            except UnicodeDecodeError:
                return self._fail(CLOSE_INVALID_DATA, "invalid utf-8 in text message")
            # TextMessage(text) through its frozen-dataclass __init__ costs
            # about 100 ns more than setting the slot directly.
            message = _new_object(TextMessage)
            _set_text(message, text)
            return message
        return self._feed_slow(opcode, fin, rsv1, rsv2, rsv3, payload)

    def _feed_slow(self, opcode: int, fin: bool, rsv1: bool, rsv2: bool, rsv3: bool, payload: bytes) -> Outcome | None:
        if self._closed:
            # RFC 6455 5.5.1: after a close frame, nothing more is processed.
            return None
        if rsv1 or rsv2 or rsv3:
            # RFC 6455 5.2: RSV bits MUST be 0 unless an extension defining
            # them was negotiated; this server negotiates none.
            return self._fail(CLOSE_PROTOCOL_ERROR, "reserved bits set without an extension")
        if opcode >= OP_CLOSE:
            return self._control(opcode, fin, payload)
        if opcode == OP_CONTINUATION:
            # RFC 6455 5.4: a continuation frame only follows a non-final
            # text or binary frame.
            if not self._msg_opcode:
                return self._fail(CLOSE_PROTOCOL_ERROR, "continuation frame without a message to continue")
            return self._append(fin, payload)
        if opcode == OP_TEXT or opcode == OP_BINARY:
            # RFC 6455 5.4: fragments of one message are not interleaved with
            # another message's frames.
            if self._msg_opcode:
                return self._fail(CLOSE_PROTOCOL_ERROR, "new message before the previous one finished")
            self._msg_opcode = opcode
            self._fast_limit = -1
            if opcode == OP_TEXT:
                self._decoder = _new_utf8_decoder()
            return self._append(fin, payload)
        # RFC 6455 5.2: opcodes 0x3-0x7 are reserved non-control opcodes.
        return self._fail(CLOSE_PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")

    def _control(self, opcode: int, fin: bool, payload: bytes) -> Outcome | None:
        # RFC 6455 5.5: control frames MUST NOT be fragmented and carry at
        # most 125 bytes. They may arrive between the fragments of a message
        # (5.4), so nothing here touches the open message.
        if opcode > OP_PONG:
            # RFC 6455 5.2: opcodes 0xB-0xF are reserved control opcodes.
            return self._fail(CLOSE_PROTOCOL_ERROR, f"reserved opcode {opcode:#x}")
        if not fin:
            return self._fail(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
        if len(payload) > MAX_CONTROL_PAYLOAD_BYTES:
            return self._fail(CLOSE_PROTOCOL_ERROR, "control frame payload over 125 bytes")
        if opcode == OP_PING:
            # RFC 6455 5.5.2: answer with a pong carrying the same payload.
            return SendPong(payload)
        if opcode == OP_PONG:
            # RFC 6455 5.5.3: an unsolicited pong is allowed and needs no reply.
            return None
        return self._peer_close(payload)

    def _peer_close(self, payload: bytes) -> Fail | PeerClose:
        # RFC 6455 5.5.1: an empty close body is allowed; otherwise the body
        # starts with a 2-byte code, so a 1-byte body is malformed.
        size = len(payload)
        if size == 0:
            self.close()
            return PeerClose(CLOSE_NORMAL, "")
        if size == 1:
            return self._fail(CLOSE_PROTOCOL_ERROR, "close frame with a 1-byte payload")
        code = int.from_bytes(payload[:2], "big")
        # RFC 6455 7.4: codes outside the defined and private ranges are a
        # protocol error.
        if not is_valid_close_code(code):
            return self._fail(CLOSE_PROTOCOL_ERROR, f"invalid close code {code}")
        try:
            # RFC 6455 5.5.1: the reason is UTF-8; invalid UTF-8 is 1007 (8.1).
            reason = payload[2:].decode()
        except UnicodeDecodeError:
            return self._fail(CLOSE_INVALID_DATA, "invalid utf-8 in close reason")
        self.close()
        return PeerClose(code, reason)

    def _append(self, fin: bool, payload: bytes) -> Outcome | None:
        self._size += len(payload)
        if self._size > self._max:
            # Checked before decoding or keeping the fragment, so an
            # oversize message never grows the buffer past the limit.
            return self._fail(CLOSE_MESSAGE_TOO_BIG, f"message over {self._max} bytes")
        decoder = self._decoder
        if decoder is not None:
            # RFC 6455 8.1: invalid UTF-8 fails the connection. Decoding each
            # fragment as it arrives fails at the bad fragment, not at the
            # end of the message.
            try:
                text = decoder.decode(payload, fin)
            except UnicodeDecodeError:
                return self._fail(CLOSE_INVALID_DATA, "invalid utf-8 in text message")
            if not fin and _pending_is_surrogate(decoder):
                return self._fail(CLOSE_INVALID_DATA, "invalid utf-8 in text message")
            self._texts.append(text)
            if not fin:
                return None
            message: Outcome = TextMessage("".join(self._texts))
        else:
            self._chunks.append(payload)
            if not fin:
                return None
            message = BinaryMessage(b"".join(self._chunks))
        self._reset_message()
        self._fast_limit = self._max
        return message

    def _fail(self, code: int, reason: str) -> Fail:
        self.close()
        return Fail(code, reason)

    def _reset_message(self) -> None:
        self._msg_opcode = 0
        self._texts = []
        self._chunks = []
        self._size = 0
        self._decoder = None


def _pending_is_surrogate(decoder: codecs.IncrementalDecoder) -> bool:
    # CPython's UTF-8 decoder rejects a bad prefix as soon as it sees one
    # (F4 90, E0 80, ...) except ED A0-ED BF, the start of a UTF-16
    # surrogate, which it buffers until the third byte. Check that one case so
    # a fragment ending in half a surrogate fails fast too.
    pending = decoder.getstate()[0]
    return len(pending) >= 2 and pending[0] == 0xED and pending[1] >= 0xA0


def frame_extent(buf: bytes | bytearray | memoryview, pos: int, end: int) -> int | None:
    """The size on the wire (header, mask key, payload) of the frame whose
    header starts at ``buf[pos]`` (RFC 6455 5.2).

    None if ``buf[pos:end]`` does not hold the whole header; -1 if picows
    refuses the header from the header alone (reserved opcode, fragmented
    control frame, control payload over 125 bytes). The read splitter of
    ``gateway.adapters.framed`` walks socket reads with it.
    """
    if end - pos < 2:
        return None
    first = buf[pos]
    second = buf[pos + 1]
    opcode = first & 0x0F
    length = second & 0x7F
    if opcode not in _DEFINED_OPCODES or (opcode >= OP_CLOSE and (not first & 0x80 or length > 125)):
        return -1
    header = 6 if second & 0x80 else 2
    if length == 126:
        if end - pos < 4:
            return None
        length = (buf[pos + 2] << 8) | buf[pos + 3]
        header += 2
    elif length == 127:
        if end - pos < 10:
            return None
        length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
        header += 8
    return header + length
