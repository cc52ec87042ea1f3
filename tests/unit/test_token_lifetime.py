"""Token lifetime and revocation, the pure parts (PROTOCOL.md 9): the session's
refresh and expiry, the deadline heap, the revocation list, the control and
refresh wire formats. The socket side is in tests/integration/test_gateway_auth.py."""

from __future__ import annotations

import json

import msgspec
import pytest

from gateway.core.deadlines import Deadlines
from gateway.core.session import CheckToken, Close, LeaveRoom, Reply, Session, SessionLimits
from roomcast.auth import Authenticator, AuthError, mint
from roomcast.revocation import Revocations
from roomcast.wire.codes import CloseCode
from roomcast.wire.control import Lift, Revoke, decode_control, encode_control
from roomcast.wire.frames import FrameError, Refresh, decode_client_frame, encode_left, encode_refreshed

SECRET = "unit-secret-of-at-least-32-bytes!!"


def session(rooms=("r1", "team-a")) -> Session:
    s = Session("alice", "gw-1", SessionLimits(), lambda: "gen", exp=100.0, issued_at=50.0)
    for room in rooms:
        s.receive_text(0, json.dumps({"type": "join", "room": room}))
    return s


def test_a_refresh_frame_asks_for_its_token_to_be_checked():
    assert session().receive_text(0, '{"type":"refresh","token":"abc"}') == [CheckToken("abc")]


@pytest.mark.parametrize("frame", ['{"type":"refresh"}', '{"type":"refresh","token":""}', '{"type":"refresh","token":7}'])
def test_a_refresh_frame_without_a_token_is_a_bad_request_and_the_socket_lives(frame):
    s = session()
    (reply,) = s.receive_text(0, frame)
    assert json.loads(reply.payload)["code"] == "bad_request" and not s.closed


def test_refresh_decodes_and_the_answers_encode_as_the_protocol_says():
    assert decode_client_frame('{"type":"refresh","token":"t"}') == Refresh("t")
    with pytest.raises(FrameError):
        decode_client_frame(json.dumps({"type": "refresh", "token": "x" * 9000}))
    assert encode_refreshed(1732653600.9) == b'{"type":"refreshed","exp":1732653600}'
    assert encode_left("r1") == b'{"type":"left","room":"r1"}'
    assert encode_left("r1", "forbidden") == b'{"type":"left","room":"r1","reason":"forbidden"}'


def test_refreshed_takes_the_new_exp_and_leaves_the_rooms_no_longer_allowed():
    s = session()
    actions = s.refreshed("alice", 200.0, 150.0, lambda room: room.startswith("r"))
    assert actions == [Reply(encode_refreshed(200)), LeaveRoom("team-a", "forbidden")]
    assert (s.exp, s.issued_at, s.rooms) == (200.0, 150.0, ["r1"])
    (reply,) = s.receive_text(0, '{"type":"join","room":"team-b"}')
    assert json.loads(reply.payload)["code"] == "forbidden"


def test_refreshed_without_a_rooms_claim_allows_every_room():
    s = Session("alice", "gw-1", SessionLimits(), lambda: "gen", may_use_room=lambda room: False)
    assert s.refreshed("alice", 200.0, None, None) == [Reply(encode_refreshed(200))]
    (action,) = s.receive_text(0, '{"type":"join","room":"anything"}')
    assert action.room == "anything"


def test_a_token_of_another_user_closes_with_4003_and_changes_nothing():
    s = session()
    assert s.refreshed("mallory", 999.0, 1.0, None) == [Close(CloseCode.REFRESH_REFUSED, "refresh refused: token is for another user")]
    assert s.closed and s.exp == 100.0
    assert s.receive_text(0, '{"type":"join","room":"r9"}') == []


def test_a_bad_token_closes_with_4003_and_expiry_with_4001_once():
    s = session()
    assert s.refresh_refused("token expired") == [Close(CloseCode.REFRESH_REFUSED, "refresh refused: token expired")]
    assert s.refresh_refused("again") == [] and s.expired() == []
    t = session()
    assert t.expired() == [Close(CloseCode.TOKEN_EXPIRED, "token expired; reconnect with a fresh token")]
    assert t.expired() == [] and t.refreshed("alice", 500.0, 1.0, None) == []


def test_close_codes_are_the_protocols():
    assert (CloseCode.TOKEN_EXPIRED, CloseCode.REVOKED, CloseCode.REFRESH_REFUSED) == (4001, 4002, 4003)


def test_deadlines_fall_due_in_order_and_retain_drops_dead_entries():
    d: Deadlines[str] = Deadlines()
    for at, item in [(5.0, "e"), (1.0, "a"), (3.0, "c"), (3.0, "c2"), (9.0, "z")]:
        d.add(at, item)
    assert d.next_at() == 1.0
    assert d.due(0.5) == []
    assert d.due(3.0) == ["a", "c", "c2"]
    assert d.next_at() == 5.0 and len(d) == 2
    d.retain(lambda item: item != "e")
    assert d.due(100.0) == ["z"] and d.next_at() is None


def test_deadlines_never_compare_items():
    d: Deadlines[object] = Deadlines()
    d.add(1.0, object())
    d.add(1.0, object())  # equal times: object() has no ordering
    assert len(d.due(1.0)) == 2


def test_revocation_refuses_tokens_issued_at_or_before_it_and_unknown_iat():
    r = Revocations()
    r.revoke("alice", 100.5)
    assert r.refuses("alice", 100.0) and r.refuses("alice", 100.5) and r.refuses("alice", None)
    assert not r.refuses("alice", 101.0) and not r.refuses("bob", None)
    r.revoke("alice", 50.0)  # an older one replayed does not shorten it
    assert r.refuses("alice", 100.0)
    r.lift("alice")
    assert not r.refuses("alice", None)
    r.replace({"bob": 10.0})
    assert r.refuses("bob", 9.0) and len(r) == 1


def test_control_commands_round_trip_and_anything_else_is_refused():
    for command in (Revoke("alice", 1732650000.25), Lift("alice")):
        assert decode_control(encode_control(command)) == command
    for bad in (b"", b"{}", b'{"op":"explode","user":"a"}', b'{"op":"revoke","user":"a"}', b"[1]"):
        with pytest.raises(msgspec.DecodeError):
            decode_control(bad)


def test_identity_carries_exp_and_iat_and_verify_checks_a_bare_token():
    auth = Authenticator("jwt", SECRET, now=lambda: 1_000_000.0)
    identity = auth.verify(mint(SECRET, "alice", ["r1"], ttl_s=60, now=lambda: 1_000_000.0))
    assert (identity.user, identity.exp, identity.issued_at, identity.rooms) == ("alice", 1_000_060, 1_000_000, ("r1",))
    with pytest.raises(AuthError, match="expired"):
        Authenticator("jwt", SECRET, now=lambda: 2_000_000.0).verify(mint(SECRET, "alice", now=lambda: 1_000_000.0))
    with pytest.raises(AuthError, match="does not use tokens"):
        Authenticator("dev").verify("anything")
