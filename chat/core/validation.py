"""Validation of an ingest record before it is stored (PROTOCOL.md sections 1, 2, 4).

The gateway already refuses bad frames; this is the chat service's own check,
because anything can write to `message.ingest`. A refused record is logged and
skipped by the caller, never stored.
"""

from __future__ import annotations

from roomcast.wire.events import IngestRecord
from roomcast.wire.frames import DEFAULT_MAX_BODY_BYTES, MAX_CLIENT_MSG_ID_CHARS, is_valid_room_id

__all__ = ["validate_ingest"]


def validate_ingest(record: IngestRecord, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> str | None:
    """Why `record` must not be stored, or None when it is fine.

    Checks the room id pattern, a non-empty user, a non-empty body of at most
    `max_body_bytes` bytes of UTF-8 and a client_msg_id of 1-64 characters.
    Never raises for a record msgspec decoded.
    """
    if not isinstance(record.room, str) or not is_valid_room_id(record.room):
        return "room must be 1 to 128 characters of A-Z a-z 0-9 _ . : -"
    if not isinstance(record.user, str) or not record.user:
        return "user is empty"
    body = record.body
    if not isinstance(body, str) or not body:
        return "body is empty"
    try:
        size = len(body.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates: not from a JSON decoder, but from Python code
        return "body is not valid UTF-8"
    if size > max_body_bytes:
        return f"body is {size} bytes of UTF-8, over the limit of {max_body_bytes}"
    cmid = record.client_msg_id
    if not isinstance(cmid, str) or not 1 <= len(cmid) <= MAX_CLIENT_MSG_ID_CHARS:
        return "client_msg_id must be 1 to 64 characters"
    return None

