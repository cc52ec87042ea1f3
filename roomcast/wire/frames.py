"""Client and server frames (docs/PROTOCOL.md sections 2 and 3).

Client frames decode with msgspec into a tagged union: one C-level pass that
parses and validates. Only a refused frame takes the slow path, which parses it
again loosely to find the `ref` to echo.
"""

from __future__ import annotations

import re
from typing import Annotated, Union

import msgspec

from roomcast.wire.codes import ErrorCode

__all__ = [
    "ROOM_ID_PATTERN",
    "Join",
    "Leave",
    "Send",
    "Refresh",
    "ClientFrame",
    "FrameError",
    "decode_client_frame",
    "is_valid_room_id",
    "DEFAULT_MAX_BODY_BYTES",
    "MAX_CLIENT_MSG_ID_CHARS",
    "encode_joined",
    "encode_left",
    "encode_ack",
    "encode_refreshed",
    "encode_error",
    "MESSAGE_ENVELOPE_HEAD",
    "MESSAGE_ENVELOPE_TAIL",
    "message_envelope",
]

# PROTOCOL.md 1: 1 to 128 characters of A-Z a-z 0-9 _ . : -
ROOM_ID_PATTERN = r"^[A-Za-z0-9_.:\-]{1,128}\Z"  # \Z: `$` would let a trailing newline through
_room_id_re = re.compile(ROOM_ID_PATTERN)

RoomId = Annotated[str, msgspec.Meta(pattern=ROOM_ID_PATTERN)]
MAX_CLIENT_MSG_ID_CHARS = 64
"""PROTOCOL.md 2: a client_msg_id is 1 to 64 characters."""

DEFAULT_MAX_BODY_BYTES = 4096
"""PROTOCOL.md 3: a body over this many bytes of UTF-8 is `too_large`, by default (setting max_body_bytes)."""

ClientMsgId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CLIENT_MSG_ID_CHARS)]
Seq = Annotated[int, msgspec.Meta(ge=0)]

MAX_TOKEN_CHARS = 8192
"""Longest token a `refresh` frame may carry (an RS256 JWT with many room patterns fits)."""


def is_valid_room_id(room: str) -> bool:
    return _room_id_re.match(room) is not None


class Join(msgspec.Struct, tag_field="type", tag="join", frozen=True):
    room: RoomId
    since: Seq | None = None


class Leave(msgspec.Struct, tag_field="type", tag="leave", frozen=True):
    room: RoomId


class Send(msgspec.Struct, tag_field="type", tag="message.send", frozen=True):
    room: RoomId
    body: str
    # Optional on the wire; the gateway assigns one when absent so that every
    # post stays idempotent through the pipeline.
    client_msg_id: ClientMsgId | None = None


class Refresh(msgspec.Struct, tag_field="type", tag="refresh", frozen=True):
    """A fresh token for this socket (v1.1): answered `refreshed`, or closed with 4003."""

    token: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TOKEN_CHARS)]


ClientFrame = Union[Join, Leave, Send, Refresh]

_client_decoder = msgspec.json.Decoder(ClientFrame)
_loose_decoder = msgspec.json.Decoder()


class FrameError(Exception):
    """A client frame was refused: becomes an `error` frame, the socket lives on."""

    def __init__(self, code: ErrorCode, message: str, ref: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref


def _ref_of(text: str | bytes) -> str | None:
    """`client_msg_id`, else `type`, of a refused frame, if it has one that is a string."""
    try:
        obj = _loose_decoder.decode(text)
    except (msgspec.DecodeError, RecursionError, UnicodeError):
        return None
    if not isinstance(obj, dict):
        return None
    for key in ("client_msg_id", "type"):
        value = obj.get(key)
        if isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return None


def decode_client_frame(text: str | bytes) -> ClientFrame:
    """Parse one client text frame. Raises FrameError(bad_request) when refused."""
    if type(text) is not str:
        # msgspec checks UTF-8 only in the strings it keeps: a field it skips
        # could hold any bytes. JSON text is UTF-8 (RFC 8259 8.1): check it
        # here. The gateway passes str (picows' layer checked it already).
        try:
            text.decode()
        except UnicodeDecodeError:
            raise FrameError(ErrorCode.BAD_REQUEST, "frame is not valid UTF-8") from None
    try:
        return _client_decoder.decode(text)
    except msgspec.ValidationError as exc:
        raise FrameError(ErrorCode.BAD_REQUEST, _describe(str(exc)), _ref_of(text)) from None
    except msgspec.DecodeError:
        raise FrameError(ErrorCode.BAD_REQUEST, "frame is not valid JSON") from None
    except (RecursionError, UnicodeError):  # absurd nesting; a str with a lone surrogate
        raise FrameError(ErrorCode.BAD_REQUEST, "frame is not valid JSON", None) from None


def _describe(msgspec_error: str) -> str:
    # msgspec says e.g. "Object missing required field `room`" or
    # "Expected `str`, got `int` - at `$.body`"; keep it, lowercased first letter.
    if "Object contains unknown field" in msgspec_error:  # pragma: no cover - fields are ignored
        return msgspec_error
    if msgspec_error.startswith("Expected `object`"):
        return "frame must be a JSON object"
    if "Invalid value" in msgspec_error and "$.type" in msgspec_error:
        return "unknown frame type; expected join, leave, message.send or refresh"
    if "missing required field `type`" in msgspec_error:
        return "frame has no `type`"
    if "$.room" in msgspec_error and ("match" in msgspec_error or "Expected `str`" not in msgspec_error):
        return "room must be 1 to 128 characters of A-Z a-z 0-9 _ . : -"
    return msgspec_error[0].lower() + msgspec_error[1:]


# ---- server frames -------------------------------------------------------

_encoder = msgspec.json.Encoder()


class _Joined(msgspec.Struct, tag_field="type", tag="joined", omit_defaults=True):
    room: str
    seq: int
    recovered: bool = True  # only written when false (PROTOCOL.md 3)


class _Left(msgspec.Struct, tag_field="type", tag="left", omit_defaults=True):
    room: str
    reason: str | None = None  # v1.1: "forbidden" when a refreshed token no longer allows the room


class _Refreshed(msgspec.Struct, tag_field="type", tag="refreshed"):
    exp: int


class _Ack(msgspec.Struct, tag_field="type", tag="ack"):
    client_msg_id: str


class _Error(msgspec.Struct, tag_field="type", tag="error"):
    code: str
    message: str
    ref: str | None


def encode_joined(room: str, seq: int, recovered: bool = True) -> bytes:
    return _encoder.encode(_Joined(room, seq, recovered))


def encode_left(room: str, reason: str | None = None) -> bytes:
    return _encoder.encode(_Left(room, reason))


def encode_refreshed(exp: float) -> bytes:
    return _encoder.encode(_Refreshed(int(exp)))


def encode_ack(client_msg_id: str) -> bytes:
    return _encoder.encode(_Ack(client_msg_id))


def encode_error(code: ErrorCode, message: str, ref: str | None = None) -> bytes:
    return _encoder.encode(_Error(code.value, message, ref))


# PROTOCOL.md 4: the client frame of an event is these bytes around the payload
# exactly as published on Redis; nothing decodes or re-encodes it per socket.
MESSAGE_ENVELOPE_HEAD = b'{"type":"message","data":'
MESSAGE_ENVELOPE_TAIL = b"}"


def message_envelope(event_payload: bytes) -> bytes:
    return MESSAGE_ENVELOPE_HEAD + event_payload + MESSAGE_ENVELOPE_TAIL
