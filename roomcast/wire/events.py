"""Payloads between services (docs/PROTOCOL.md section 4).

`MessageEvent` is the JSON on Kafka `message.created`, on Redis `room:<id>` and
inside the client `message` frame. `IngestRecord` is the JSON on Kafka
`message.ingest`.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

__all__ = [
    "MessageEvent",
    "IngestRecord",
    "EventSeq",
    "INGEST_TOPIC",
    "CREATED_TOPIC",
    "CHAT_GROUP",
    "GATEWAY_GROUP",
    "ROOM_CHANNEL_PREFIX",
    "room_channel",
    "encode_event",
    "decode_event",
    "encode_ingest",
    "decode_ingest",
    "decode_event_seq",
]

INGEST_TOPIC = "message.ingest"
CREATED_TOPIC = "message.created"
CHAT_GROUP = "chat-service"
GATEWAY_GROUP = "realtime-gateway-group"
ROOM_CHANNEL_PREFIX = "room:"


def room_channel(room: str) -> str:
    """The Redis pub/sub channel of a room."""
    return ROOM_CHANNEL_PREFIX + room


class MessageEvent(msgspec.Struct, frozen=True):
    """A stored message. `seq` is per room: 1, 2, 3 ... with no gap and no reuse."""

    id: str
    room: str
    seq: int
    user: str
    body: str
    client_msg_id: str
    ts: int  # ms since the Unix epoch, set by the chat service when storing


class IngestRecord(msgspec.Struct, frozen=True):
    """A post on its way from a gateway to the chat service."""

    room: str
    user: str
    body: str
    client_msg_id: str
    gateway: str
    received_at: int  # ms since the Unix epoch, when the gateway read the frame


class EventSeq(msgspec.Struct):
    """The one field of an event the gateway reads on the fan-out path.

    Decoding into this skips every other field, so extra fields in a payload
    published by someone else pass through untouched (PROTOCOL.md 4).
    """

    seq: int


_event_encoder = msgspec.json.Encoder()
_event_decoder = msgspec.json.Decoder(MessageEvent)
_ingest_decoder = msgspec.json.Decoder(IngestRecord)
_seq_decoder = msgspec.json.Decoder(EventSeq)

# What msgspec raises besides DecodeError: RecursionError for absurd nesting
# (even inside a field it skips), UnicodeEncodeError for a str holding a lone
# surrogate. Callers catch DecodeError only, so these become one.
_NOT_JSON = (RecursionError, UnicodeEncodeError)

T = TypeVar("T")


def encode_event(event: MessageEvent) -> bytes:
    return _event_encoder.encode(event)


def _decode(decoder: msgspec.json.Decoder[T], data: bytes | str) -> T:
    try:
        return decoder.decode(data)
    except _NOT_JSON as exc:
        raise msgspec.DecodeError(f"payload is not JSON: {exc}") from None


def decode_event(data: bytes | str) -> MessageEvent:
    """Raises msgspec.DecodeError (a ValueError) on bad JSON or schema."""
    return _decode(_event_decoder, data)


def encode_ingest(record: IngestRecord) -> bytes:
    return _event_encoder.encode(record)


def decode_ingest(data: bytes | str) -> IngestRecord:
    """Raises msgspec.DecodeError (a ValueError) on bad JSON or schema."""
    return _decode(_ingest_decoder, data)


def decode_event_seq(data: bytes) -> int:
    """The `seq` of an event payload. Raises msgspec.DecodeError if it has none."""
    return _decode(_seq_decoder, data).seq


class _MaybeSeq(msgspec.Struct):
    seq: int | None = None


_maybe_seq_decoder = msgspec.json.Decoder(_MaybeSeq)


def decode_optional_seq(data: bytes) -> int | None:
    """The `seq` of an event payload, None for a JSON object without one (a
    third party's unsequenced event, PROTOCOL.md 6.7). Raises msgspec.DecodeError
    for anything that is not a JSON object, or a `seq` that is not an integer."""
    return _decode(_maybe_seq_decoder, data).seq
