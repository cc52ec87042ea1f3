"""Fuzz target: the session's frame parser (gateway.core.session.Session.receive_text,
over roomcast.wire.frames.decode_client_frame).

The input is a conversation: client frames separated by NUL bytes (raw NUL
is never valid inside JSON text, so no frame loses a valid byte to it).
Each frame goes in as bytes, or as str (what the picows adapter passes) when
its first byte is even and it is UTF-8. The clock moves 10 ms per frame and
the limits are tiny, so the room limit, the send budget and the abuse close
are reached within a few frames. Rooms starting with ``x`` are forbidden.

Properties, per frame:

- ``receive_text`` never raises and returns only documented actions, in one
  of the documented shapes: ``[JoinRoom]``, ``[LeaveRoom]``, ``[Reply(left)]``,
  ``[Post]``, ``[Reply(error)]`` or ``[Reply(error), Close(1008)]``;
- a frame that is not JSON at all is refused with a ``bad_request`` error
  reply; every error reply is a JSON ``error`` frame with a documented code;
- a closed session returns nothing; a close happens only for abuse;
- joins and posts name only valid, allowed rooms; the session is never in
  more rooms than its limit; a post's body is non-empty and within the byte
  limit; a posted record survives the ingest encoding round trip.
"""

from __future__ import annotations

import json

from gateway.core.session import Close, JoinRoom, LeaveRoom, Post, Reply, Session, SessionLimits
from roomcast.wire.codes import CloseCode, ErrorCode
from roomcast.wire.events import decode_ingest, encode_ingest
from roomcast.wire.frames import is_valid_room_id

LIMITS = SessionLimits(max_body_bytes=64, send_rate_per_s=5.0, send_burst=3, abuse_max_errors=4, abuse_window_ms=1000, max_rooms=3)
_ERROR_CODES = {code.value for code in ErrorCode}


def _may_use(room: str) -> bool:
    return not room.startswith("x")


def check(data: bytes) -> None:
    ids = iter(range(1_000_000))
    session = Session("u1", "gw-fuzz", LIMITS, lambda: f"gen-{next(ids)}", _may_use)
    now_ms = 0
    for raw in data.split(b"\x00"):
        now_ms += 10
        text: str | bytes = raw
        if raw[:1] and raw[0] % 2 == 0:
            try:
                text = raw.decode()
            except UnicodeDecodeError:
                pass
        was_closed = session.closed
        actions = session.receive_text(now_ms, text)
        assert type(actions) is list, actions
        if was_closed:
            assert actions == [], f"a closed session answered {actions!r}"
            continue
        _check_actions(actions, raw)
        assert session.closed == any(isinstance(a, Close) for a in actions)
        assert len(session.rooms) <= LIMITS.max_rooms and len(set(session.rooms)) == len(session.rooms)


def _check_actions(actions: list[object], raw: bytes) -> None:
    assert len(actions) in (1, 2), f"expected one action, or an error reply and a close; got {actions!r}"
    first = actions[0]
    if not _is_json(raw):
        assert isinstance(first, Reply), f"a frame that is not JSON got {actions!r}"
        assert _error_code(first) == ErrorCode.BAD_REQUEST.value
    if len(actions) == 2:
        # Only a refusal closes: its error reply goes first (PROTOCOL.md 3).
        assert isinstance(first, Reply) and _error_code(first) is not None, actions
        assert actions[1] == Close(CloseCode.ABUSE, "too many refused frames"), actions
        return
    if isinstance(first, Reply):
        frame = json.loads(first.payload)
        if frame["type"] == "left":
            assert set(frame) == {"type", "room"} and is_valid_room_id(frame["room"]), frame
        else:
            assert _error_code(first) is not None, frame
    elif isinstance(first, JoinRoom):
        assert is_valid_room_id(first.room) and _may_use(first.room), first
        assert first.since is None or (type(first.since) is int and first.since >= 0), first
    elif isinstance(first, LeaveRoom):
        assert is_valid_room_id(first.room), first
    elif isinstance(first, Post):
        record = first.record
        assert is_valid_room_id(record.room) and _may_use(record.room), record
        assert 0 < len(record.body.encode()) <= LIMITS.max_body_bytes, record
        assert 1 <= len(record.client_msg_id) <= 64, record
        assert decode_ingest(encode_ingest(record)) == record
    else:
        raise AssertionError(f"undocumented action {first!r}")


def _error_code(reply: Reply) -> str | None:
    """The code of an error reply, checked against the contract; None if not an error."""
    frame = json.loads(reply.payload)
    if frame.get("type") != "error":
        return None
    assert set(frame) == {"type", "code", "message", "ref"}, frame
    assert frame["code"] in _ERROR_CODES and isinstance(frame["message"], str) and frame["message"], frame
    assert frame["ref"] is None or isinstance(frame["ref"], str), frame
    return frame["code"]  # type: ignore[no-any-return]


def _is_json(raw: bytes) -> bool:
    # Python's json is laxer than msgspec (NaN, lone surrogates), never
    # stricter on syntax, so "json refuses it" means "not JSON". Its own
    # limits (nesting depth, 4300-digit ints) prove nothing either way.
    try:
        json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    except (RecursionError, ValueError):
        return True
    return True
