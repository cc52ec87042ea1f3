"""Per-socket protocol state: a text frame in, actions out (gateway/core/session.py)."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest

from gateway.core.session import Close, JoinRoom, LeaveRoom, Post, Reply, Session, SessionLimits
from roomcast.config import GatewayConfig
from roomcast.wire.codes import CloseCode
from roomcast.wire.events import IngestRecord

T0 = 1_732_650_000_000


def make_session(*, may_use_room=None, **limits) -> Session:
    ids = (f"gen-{n}" for n in itertools.count(1))
    kwargs = {} if may_use_room is None else {"may_use_room": may_use_room}
    return Session("alice", "gw-1", SessionLimits(**limits), lambda: next(ids), **kwargs)


def frame(**obj) -> str:
    return json.dumps(obj, separators=(",", ":"))


def send(room="r1", body="hi", client_msg_id=None) -> str:
    obj = {"type": "message.send", "room": room, "body": body}
    if client_msg_id is not None:
        obj["client_msg_id"] = client_msg_id
    return frame(**obj)


def error_of(actions) -> dict:
    """The single error reply among actions."""
    replies = [json.loads(a.payload) for a in actions if isinstance(a, Reply)]
    assert len(replies) == 1, actions
    assert replies[0]["type"] == "error", replies[0]
    assert set(replies[0]) == {"type", "code", "message", "ref"}
    return replies[0]


def closes(actions) -> list[Close]:
    return [a for a in actions if isinstance(a, Close)]


# ---- happy paths -------------------------------------------------------------


def test_session_join_returns_join_room_action():
    s = make_session()
    assert s.receive_text(T0, frame(type="join", room="r1")) == [JoinRoom("r1", None)]
    assert s.rooms == ["r1"]


def test_session_join_with_since_carries_since():
    s = make_session()
    assert s.receive_text(T0, frame(type="join", room="r1", since=41)) == [JoinRoom("r1", 41)]


def test_session_accepts_bytes_frames_too():
    s = make_session()
    assert s.receive_text(T0, b'{"type":"join","room":"r1"}') == [JoinRoom("r1", None)]


def test_session_post_carries_an_ingest_record_with_user_gateway_and_now():
    s = make_session()
    now = T0 + 1234
    actions = s.receive_text(now, send(room="r1", body="hi \u00e9", client_msg_id="c-1"))
    assert actions == [
        Post(IngestRecord(room="r1", user="alice", body="hi \u00e9", client_msg_id="c-1", gateway="gw-1", received_at=now))
    ]


def test_session_post_without_client_msg_id_gets_a_generated_one():
    s = make_session()
    first = s.receive_text(T0, send(body="a"))
    second = s.receive_text(T0, send(body="b"))
    assert [a.record.client_msg_id for a in first + second] == ["gen-1", "gen-2"]


def test_session_post_with_client_msg_id_does_not_generate_one():
    calls = []
    s = Session("alice", "gw-1", SessionLimits(), lambda: calls.append(1) or "gen")
    s.receive_text(T0, send(client_msg_id="c-1"))
    assert calls == []


def test_session_may_post_to_a_room_it_has_not_joined():
    s = make_session()
    [action] = s.receive_text(T0, send(room="elsewhere"))
    assert isinstance(action, Post) and action.record.room == "elsewhere"


def test_session_accepts_whitespace_body():
    s = make_session()
    [action] = s.receive_text(T0, send(body=" "))
    assert isinstance(action, Post)


def test_session_limit_defaults_match_the_config_defaults():
    c = GatewayConfig()
    limits = SessionLimits()
    assert limits.max_body_bytes == c.max_body_bytes
    assert limits.send_rate_per_s == c.send_rate_per_s
    assert limits.send_burst == c.send_burst
    assert limits.abuse_max_errors == c.abuse_max_errors
    assert limits.abuse_window_ms == c.abuse_window_ms


# ---- join/leave bookkeeping ------------------------------------------------------


def test_session_leave_of_a_joined_room_returns_leave_room_and_forgets_it():
    s = make_session()
    s.receive_text(T0, frame(type="join", room="r1"))
    assert s.receive_text(T0, frame(type="leave", room="r1")) == [LeaveRoom("r1")]
    assert s.rooms == []


def test_session_leave_of_a_room_not_joined_answers_left():
    s = make_session()
    actions = s.receive_text(T0, frame(type="leave", room="r9"))
    assert len(actions) == 1 and isinstance(actions[0], Reply)
    assert json.loads(actions[0].payload) == {"type": "left", "room": "r9"}


def test_session_second_leave_answers_left_without_a_second_leave_room():
    s = make_session()
    s.receive_text(T0, frame(type="join", room="r1"))
    s.receive_text(T0, frame(type="leave", room="r1"))
    [action] = s.receive_text(T0, frame(type="leave", room="r1"))
    assert isinstance(action, Reply) and json.loads(action.payload)["type"] == "left"


def test_session_repeated_join_is_passed_on_and_keeps_one_room():
    s = make_session()
    s.receive_text(T0, frame(type="join", room="r1"))
    assert s.receive_text(T0, frame(type="join", room="r1")) == [JoinRoom("r1", None)]
    assert s.rooms == ["r1"]


def test_session_refuses_a_join_over_max_rooms():
    s = make_session(max_rooms=2)
    s.receive_text(T0, frame(type="join", room="a"))
    s.receive_text(T0, frame(type="join", room="b"))
    error = error_of(s.receive_text(T0, frame(type="join", room="c")))
    assert error["code"] == "bad_request"
    assert error["ref"] == "join"
    assert "2" in error["message"]
    assert sorted(s.rooms) == ["a", "b"]


def test_session_at_max_rooms_may_join_a_room_it_is_in_again():
    s = make_session(max_rooms=2)
    s.receive_text(T0, frame(type="join", room="a"))
    s.receive_text(T0, frame(type="join", room="b"))
    assert s.receive_text(T0, frame(type="join", room="a")) == [JoinRoom("a", None)]


def test_session_leave_frees_a_room_slot():
    s = make_session(max_rooms=1)
    s.receive_text(T0, frame(type="join", room="a"))
    s.receive_text(T0, frame(type="leave", room="a"))
    assert s.receive_text(T0, frame(type="join", room="b")) == [JoinRoom("b", None)]


# ---- bad_request ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text, ref",
    [
        ("not json", None),
        ("[1,2]", None),
        ('{"room":"r1"}', None),
        ('{"type":"shout","room":"r1"}', "shout"),
        ('{"type":"join"}', "join"),
        ('{"type":"join","room":"a b"}', "join"),
        ('{"type":"join","room":"r1","since":-1}', "join"),
        ('{"type":"message.send","room":"r1","body":5,"client_msg_id":"c-3"}', "c-3"),
        ('{"type":"message.send","room":"r1","body":"x","client_msg_id":""}', "message.send"),
    ],
)
def test_session_answers_bad_request_error_frame_and_stays_open(text, ref):
    s = make_session()
    actions = s.receive_text(T0, text)
    error = error_of(actions)
    assert error["code"] == "bad_request"
    assert error["ref"] == ref
    assert closes(actions) == []
    assert not s.closed


def test_session_refuses_empty_body_as_bad_request():
    s = make_session()
    error = error_of(s.receive_text(T0, send(body="", client_msg_id="c-4")))
    assert error["code"] == "bad_request"
    assert error["ref"] == "c-4"


def test_session_refused_join_does_not_add_the_room():
    s = make_session()
    s.receive_text(T0, frame(type="join", room="a/b"))
    assert s.rooms == []


# ---- forbidden --------------------------------------------------------------------


def only_team_rooms(room: str) -> bool:
    return room.startswith("team-")


def test_session_refuses_join_of_a_room_the_token_does_not_allow():
    s = make_session(may_use_room=only_team_rooms)
    error = error_of(s.receive_text(T0, frame(type="join", room="secret")))
    assert error["code"] == "forbidden"
    assert error["ref"] == "join"
    assert "secret" in error["message"]
    assert s.rooms == []


def test_session_allows_join_of_a_room_the_token_allows():
    s = make_session(may_use_room=only_team_rooms)
    assert s.receive_text(T0, frame(type="join", room="team-a")) == [JoinRoom("team-a", None)]


def test_session_refuses_post_to_a_room_the_token_does_not_allow_with_client_msg_id_as_ref():
    s = make_session(may_use_room=only_team_rooms)
    error = error_of(s.receive_text(T0, send(room="secret", client_msg_id="c-5")))
    assert error["code"] == "forbidden"
    assert error["ref"] == "c-5"


def test_session_refuses_post_to_a_room_the_token_does_not_allow_with_type_as_ref():
    s = make_session(may_use_room=only_team_rooms)
    error = error_of(s.receive_text(T0, send(room="secret")))
    assert error["code"] == "forbidden"
    assert error["ref"] == "message.send"


def test_session_asks_may_use_room_with_the_room_id():
    asked = []
    s = make_session(may_use_room=lambda room: asked.append(room) or True)
    s.receive_text(T0, frame(type="join", room="r1"))
    s.receive_text(T0, send(room="r2"))
    assert asked == ["r1", "r2"]


# ---- too_large ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        "a" * 4096,
        "\u00e9" * 2048,  # 2-byte characters
        "\u20ac" * 1365 + "a",  # 3-byte characters: 4095 + 1
        "\U0001f600" * 1024,  # 4-byte characters
        "a" * 1024,  # 1024 characters: the 4-bytes-per-char shortcut's edge
    ],
    ids=["ascii", "two-byte", "three-byte", "four-byte", "1024-chars"],
)
def test_session_accepts_body_of_exactly_the_limit_in_utf8_bytes(body):
    s = make_session(max_body_bytes=4096)
    [action] = s.receive_text(T0, send(body=body))
    assert isinstance(action, Post)
    assert action.record.body == body


@pytest.mark.parametrize(
    "body",
    [
        "a" * 4097,
        "\u00e9" * 2048 + "a",
        "\u20ac" * 1365 + "\u00e9",  # 4095 + 2
        "\U0001f600" * 1024 + "a",
        "a" * 4095 + "\u00e9",  # 4095 characters, 4097 bytes
        "\U0001f600" * 1025,
    ],
    ids=["ascii", "two-byte-plus-one", "three-byte-plus-two", "four-byte-plus-one", "ascii-then-two-byte", "four-byte-plus-four"],
)
def test_session_refuses_body_one_utf8_byte_over_the_limit_as_too_large(body):
    s = make_session(max_body_bytes=4096)
    actions = s.receive_text(T0, send(body=body, client_msg_id="c-6"))
    error = error_of(actions)
    assert error["code"] == "too_large"
    assert error["ref"] == "c-6"
    assert "4096" in error["message"]
    assert not s.closed


def test_session_too_large_without_client_msg_id_refs_the_type():
    s = make_session(max_body_bytes=10)
    assert error_of(s.receive_text(T0, send(body="x" * 11)))["ref"] == "message.send"


def test_session_honours_a_small_body_limit_with_multibyte_characters():
    s = make_session(max_body_bytes=5)
    assert isinstance(s.receive_text(T0, send(body="\u00e9\u00e9a"))[0], Post)  # 5 bytes
    assert error_of(s.receive_text(T0, send(body="\u00e9\u00e9\u00e9")))["code"] == "too_large"  # 6 bytes, 3 chars


# ---- rate_limited ------------------------------------------------------------------


def test_session_refuses_posts_over_the_burst_as_rate_limited():
    s = make_session(send_rate_per_s=10.0, send_burst=3, abuse_max_errors=1000)
    results = [s.receive_text(T0, send(client_msg_id=f"c-{i}")) for i in range(4)]
    assert all(isinstance(r[0], Post) for r in results[:3])
    error = error_of(results[3])
    assert error["code"] == "rate_limited"
    assert error["ref"] == "c-3"
    assert not s.closed


def test_session_send_budget_refills_over_time():
    s = make_session(send_rate_per_s=10.0, send_burst=2, abuse_max_errors=1000)
    for _ in range(2):
        s.receive_text(T0, send())
    assert error_of(s.receive_text(T0 + 50, send()))["code"] == "rate_limited"
    assert isinstance(s.receive_text(T0 + 100, send())[0], Post)
    assert error_of(s.receive_text(T0 + 100, send()))["code"] == "rate_limited"
    # A long pause refills up to the burst, not beyond.
    later = T0 + 60_000
    kinds = [type(s.receive_text(later, send())[0]) for _ in range(3)]
    assert kinds == [Post, Post, Reply]


def test_session_refused_posts_do_not_spend_the_send_budget():
    s = make_session(send_rate_per_s=10.0, send_burst=1, max_body_bytes=10, may_use_room=only_team_rooms)
    s.receive_text(T0, send(room="team-a", body="x" * 11))  # too_large
    s.receive_text(T0, send(room="secret"))  # forbidden
    s.receive_text(T0, send(room="team-a", body=""))  # bad_request
    s.receive_text(T0, send(room="bad room"))  # bad_request
    assert isinstance(s.receive_text(T0, send(room="team-a"))[0], Post)


def test_session_joins_and_leaves_do_not_spend_the_send_budget():
    s = make_session(send_rate_per_s=10.0, send_burst=1)
    for _ in range(5):
        s.receive_text(T0, frame(type="join", room="r1"))
        s.receive_text(T0, frame(type="leave", room="r1"))
    assert isinstance(s.receive_text(T0, send())[0], Post)


# ---- binary frames and abuse closes -------------------------------------------------


def test_session_refuses_binary_frame_with_1003():
    s = make_session()
    assert s.refuse_binary() == [Close(1003, "binary frames are not supported")]
    assert s.closed
    assert CloseCode.BINARY_FRAME == 1003


def test_session_closes_with_1008_after_more_than_abuse_max_errors_refused_frames_in_the_window():
    s = make_session(abuse_max_errors=3, abuse_window_ms=1_000)
    for i in range(3):
        actions = s.receive_text(T0 + i, "not json")
        assert closes(actions) == [] and not s.closed
    actions = s.receive_text(T0 + 500, "not json")
    assert error_of(actions)["code"] == "bad_request"  # the error still goes out, then the close
    assert isinstance(actions[0], Reply) and actions[-1] == Close(1008, "too many refused frames")
    assert s.closed


def test_session_does_not_close_when_refused_frames_are_spread_out():
    s = make_session(abuse_max_errors=3, abuse_window_ms=1_000)
    for i in range(50):
        actions = s.receive_text(T0 + i * 400, "not json")
        assert closes(actions) == []
    assert not s.closed


@pytest.mark.parametrize(
    "bad",
    [
        "nope",
        '{"type":"join","room":"secret"}',  # forbidden
        '{"type":"message.send","room":"r1","body":"xxxxxxxxxxx"}',  # too_large
    ],
    ids=["bad_request", "forbidden", "too_large"],
)
def test_session_counts_every_kind_of_refused_frame_towards_abuse(bad):
    s = make_session(abuse_max_errors=2, abuse_window_ms=1_000, max_body_bytes=10, may_use_room=lambda r: r != "secret")
    for i in range(2):
        assert closes(s.receive_text(T0 + i, bad)) == []
    assert closes(s.receive_text(T0 + 2, bad)) == [Close(1008, "too many refused frames")]


def test_session_counts_rate_limited_posts_towards_abuse():
    s = make_session(send_rate_per_s=1.0, send_burst=1, abuse_max_errors=2, abuse_window_ms=1_000)
    s.receive_text(T0, send())
    assert closes(s.receive_text(T0, send())) == []
    assert closes(s.receive_text(T0, send())) == []
    assert closes(s.receive_text(T0, send())) == [Close(1008, "too many refused frames")]


def test_session_accepted_frames_do_not_count_towards_abuse():
    s = make_session(abuse_max_errors=1, abuse_window_ms=10_000)
    for i in range(20):
        s.receive_text(T0 + i, frame(type="join", room=f"r{i}"))
        s.receive_text(T0 + i, frame(type="leave", room=f"r{i}"))
    s.receive_text(T0 + 30, "nope")
    assert not s.closed


def test_closed_session_ignores_further_frames():
    s = make_session(abuse_max_errors=1, abuse_window_ms=1_000)
    s.receive_text(T0, "nope")
    s.receive_text(T0, "nope")
    assert s.closed
    assert s.receive_text(T0, frame(type="join", room="r1")) == []
    assert s.receive_text(T0, send()) == []
    assert s.receive_text(T0, "nope") == []
    assert s.rooms == []


def test_session_closed_by_a_binary_frame_ignores_further_text_frames():
    s = make_session()
    s.refuse_binary()
    assert s.receive_text(T0, frame(type="join", room="r1")) == []
    assert s.receive_text(T0, send()) == []


# ---- never raises for bad input ------------------------------------------------------


def test_session_answers_bad_request_for_deeply_nested_json():
    s = make_session()
    actions = s.receive_text(T0, "[" * 60_000)
    assert error_of(actions)["code"] == "bad_request"


def test_session_answers_bad_request_for_a_str_with_a_lone_surrogate():
    # Not reachable through picows + framing (strict UTF-8), but receive_text takes any str.
    s = make_session()
    actions = s.receive_text(T0, '{"type":"join","room":"\ud800"}')
    assert error_of(actions)["code"] == "bad_request"


def test_session_actions_are_frozen_values():
    action = JoinRoom("r1", None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        action.room = "r2"  # type: ignore[misc]
