"""Fuzz target: the session's frame parser (gateway.core.session.Session.receive_text,
over roomcast.wire.frames.decode_client_frame).

The input is a conversation: client frames separated by NUL bytes (raw NUL
is never valid inside JSON text, so no frame loses a valid byte to it).
Each frame goes in as bytes, or as str (what the picows adapter passes) when
its first byte is even and it is UTF-8. The clock moves 10 ms per frame and
the limits are tiny, so the room limit, the send budget and the abuse close
are reached within a few frames. Rooms starting with ``x`` are forbidden.

A ``refresh`` frame's ``CheckToken`` is answered as ``gateway.access`` would,
chosen by the token: ``bad...`` is refused, ``other...`` is another user's,
anything else is valid and from then on forbids rooms starting with its
first character.

Properties, per frame:

- ``receive_text`` never raises and returns only documented actions, in one
  of the documented shapes: ``[JoinRoom]``, ``[LeaveRoom]``, ``[Reply(left)]``,
  ``[Post]``, ``[CheckToken]``, ``[Reply(error)]`` or
  ``[Reply(error), Close(1008)]``;
- a refresh answer is ``[Reply(refreshed), LeaveRoom(room, "forbidden")...]``
  leaving exactly the joined rooms the new token forbids, or a 4003 close;
- a frame that is not JSON at all is refused with a ``bad_request`` error
  reply; every error reply is a JSON ``error`` frame with a documented code;
- a closed session returns nothing; a close happens only for abuse or a
  refused refresh;
- joins and posts name only valid, allowed rooms; the session is never in
  more rooms than its limit; a post's body is non-empty and within the byte
  limit; a posted record survives the ingest encoding round trip.
"""

from __future__ import annotations

import json

from collections.abc import Callable

from gateway.core.session import CheckToken, Close, JoinRoom, LeaveRoom, Post, Reply, Session, SessionLimits
from roomcast.wire.codes import CloseCode, ErrorCode
from roomcast.wire.events import decode_ingest, encode_ingest
from roomcast.wire.frames import MAX_TOKEN_CHARS, is_valid_room_id

LIMITS = SessionLimits(max_body_bytes=64, send_rate_per_s=5.0, send_burst=3, abuse_max_errors=4, abuse_window_ms=1000, max_rooms=3)
_ERROR_CODES = {code.value for code in ErrorCode}


def _may_use(room: str) -> bool:
    return not room.startswith("x")


def check(data: bytes) -> None:
    ids = iter(range(1_000_000))
    session = Session("u1", "gw-fuzz", LIMITS, lambda: f"gen-{next(ids)}", _may_use)
    may_use: Callable[[str], bool] = _may_use
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
        _check_actions(actions, raw, may_use)
        if isinstance(actions[0], CheckToken):
            may_use, actions = _answer_refresh(session, actions[0].token, may_use)
        assert session.closed == any(isinstance(a, Close) for a in actions)
        assert len(session.rooms) <= LIMITS.max_rooms and len(set(session.rooms)) == len(session.rooms)
        assert all(may_use(room) for room in session.rooms), (session.rooms, actions)


def _answer_refresh(session: Session, token: str, may_use: Callable[[str], bool]) -> tuple[Callable[[str], bool], list[object]]:
    """What gateway.access does with a checked token, and the properties of the answer."""
    if token.startswith("bad"):
        actions: list[object] = list(session.refresh_refused("bad token"))
        assert actions == [Close(CloseCode.REFRESH_REFUSED, "refresh refused: bad token")], actions
        return may_use, actions
    if token.startswith("other"):
        actions = list(session.refreshed("u2", None, None, None))
        assert len(actions) == 1 and isinstance(actions[0], Close) and actions[0].code == CloseCode.REFRESH_REFUSED, actions
        return may_use, actions
    forbidden = token[0]

    def new_may_use(room: str) -> bool:
        return not room.startswith(forbidden)

    joined = list(session.rooms)
    actions = list(session.refreshed("u1", 2e9, 1e9, new_may_use))
    assert actions[0] == Reply(b'{"type":"refreshed","exp":2000000000}'), actions
    assert actions[1:] == [LeaveRoom(room, "forbidden") for room in joined if not new_may_use(room)], (joined, actions)
    return new_may_use, actions


def _check_actions(actions: list[object], raw: bytes, may_use: Callable[[str], bool]) -> None:
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
        assert is_valid_room_id(first.room) and may_use(first.room), first
        assert first.since is None or (type(first.since) is int and first.since >= 0), first
    elif isinstance(first, LeaveRoom):
        assert is_valid_room_id(first.room) and first.reason is None, first
    elif isinstance(first, Post):
        record = first.record
        assert is_valid_room_id(record.room) and may_use(record.room), record
        assert 0 < len(record.body.encode()) <= LIMITS.max_body_bytes, record
        assert 1 <= len(record.client_msg_id) <= 64, record
        assert decode_ingest(encode_ingest(record)) == record
    elif isinstance(first, CheckToken):
        assert type(first.token) is str and 1 <= len(first.token) <= MAX_TOKEN_CHARS, first
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
