"""Validation of an ingest record before it is stored (PROTOCOL.md sections 1, 2, 4).

The gateway already refuses bad frames; this is the chat service's own check,
because anything can write to `message.ingest`. A refused record is logged and
skipped by the caller, never stored.
"""

from __future__ import annotations

import re

from roomcast.wire.events import IngestRecord
from roomcast.wire.frames import ROOM_ID_PATTERN

__all__ = ["DEFAULT_MAX_BODY_BYTES", "MAX_CLIENT_MSG_ID_CHARS", "is_room_id", "validate_ingest"]

DEFAULT_MAX_BODY_BYTES = 4096  # PROTOCOL.md 3: `too_large` over 4096 bytes UTF-8 by default
MAX_CLIENT_MSG_ID_CHARS = 64  # PROTOCOL.md 2: client_msg_id is 1-64 chars

# fullmatch, not match: with re.match the pattern's `$` also matches before a
# trailing newline, so "r1\n" would pass.
_room_id_re = re.compile(ROOM_ID_PATTERN)


def is_room_id(room: str) -> bool:
    """True for 1 to 128 characters of A-Z a-z 0-9 _ . : - (PROTOCOL.md 1), nothing else."""
    return _room_id_re.fullmatch(room) is not None


def validate_ingest(record: IngestRecord, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> str | None:
    """Why `record` must not be stored, or None when it is fine.

    Checks the room id pattern, a non-empty user, a non-empty body of at most
    `max_body_bytes` bytes of UTF-8 and a client_msg_id of 1-64 characters.
    Never raises for a record msgspec decoded.
    """
    if not isinstance(record.room, str) or not is_room_id(record.room):
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

