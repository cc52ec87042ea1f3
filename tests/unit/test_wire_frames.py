"""Client frame decoding and server frame encoding (PROTOCOL.md sections 1-3)."""

from __future__ import annotations

import json

import pytest

from roomcast.wire.codes import ErrorCode
from roomcast.wire.frames import (
    MESSAGE_ENVELOPE_HEAD,
    MESSAGE_ENVELOPE_TAIL,
    FrameError,
    Join,
    Leave,
    Send,
    decode_client_frame,
    encode_ack,
    encode_error,
    encode_joined,
    encode_left,
    is_valid_room_id,
    message_envelope,
)

def refused(text: str | bytes) -> FrameError:
    with pytest.raises(FrameError) as info:
        decode_client_frame(text)
    return info.value


def dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


# ---- every client frame of PROTOCOL.md 2 ---------------------------------------


def test_decode_join_without_since():
    assert decode_client_frame('{"type":"join","room":"r1"}') == Join(room="r1", since=None)


def test_decode_join_with_since():
    assert decode_client_frame('{"type":"join","room":"r1","since":41}') == Join(room="r1", since=41)


def test_decode_join_with_since_zero():
    assert decode_client_frame('{"type":"join","room":"r1","since":0}') == Join(room="r1", since=0)


def test_decode_leave():
    assert decode_client_frame('{"type":"leave","room":"r1"}') == Leave(room="r1")


def test_decode_message_send_with_client_msg_id():
    frame = decode_client_frame('{"type":"message.send","room":"r1","body":"hi","client_msg_id":"c-1"}')
    assert frame == Send(room="r1", body="hi", client_msg_id="c-1")


def test_decode_message_send_without_client_msg_id_leaves_it_none():
    frame = decode_client_frame('{"type":"message.send","room":"r1","body":"hi"}')
    assert frame == Send(room="r1", body="hi", client_msg_id=None)


def test_decode_accepts_bytes_as_well_as_str():
    assert decode_client_frame(b'{"type":"leave","room":"r1"}') == Leave(room="r1")


def test_decode_keeps_a_unicode_body_intact():
    body = "h\u00e9llo \u20ac \U0001f600 \u65e5\u672c"
    frame = decode_client_frame(dumps({"type": "message.send", "room": "r1", "body": body}))
    assert frame.body == body


def test_decode_accepts_client_msg_id_of_exactly_64_chars():
    frame = decode_client_frame(dumps({"type": "message.send", "room": "r", "body": "x", "client_msg_id": "c" * 64}))
    assert frame.client_msg_id == "c" * 64


def test_decode_accepts_client_msg_id_of_one_char():
    frame = decode_client_frame(dumps({"type": "message.send", "room": "r", "body": "x", "client_msg_id": "c"}))
    assert frame.client_msg_id == "c"


# ---- unknown fields are ignored ----------------------------------------------------


@pytest.mark.parametrize(
    "obj, expected",
    [
        ({"type": "join", "room": "r1", "extra": 1, "nested": {"a": [1, 2, {"b": None}]}}, Join("r1")),
        ({"type": "join", "room": "r1", "since": 3, "client_msg_id": "c-1"}, Join("r1", 3)),
        ({"type": "leave", "room": "r1", "since": "not checked on leave"}, Leave("r1")),
        ({"type": "message.send", "room": "r1", "body": "hi", "ts": 5, "user": "mallory"}, Send("r1", "hi")),
    ],
    ids=["join-with-extra-fields", "join-with-client-msg-id", "leave-with-since", "send-with-user-and-ts"],
)
def test_decode_ignores_unknown_fields(obj, expected):
    assert decode_client_frame(dumps(obj)) == expected


# ---- every way to get bad_request ---------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "",
        "{",
        '{"type":"join","room":"r1"',
        '{"type":"join","room":"r1"} trailing',
        b"\xff\xfe\x00",
    ],
    ids=["words", "empty", "open-brace", "truncated", "trailing-garbage", "not-utf8"],
)
def test_decode_refuses_text_that_is_not_json(text):
    error = refused(text)
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.ref is None
    assert error.message


@pytest.mark.parametrize("text", ["[]", '[{"type":"join","room":"r1"}]', '"join"', "42", "null", "true"])
def test_decode_refuses_json_that_is_not_an_object(text):
    error = refused(text)
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.message == "frame must be a JSON object"
    assert error.ref is None


def test_decode_refuses_frame_without_type():
    error = refused('{"room":"r1"}')
    assert error.code is ErrorCode.BAD_REQUEST
    assert "type" in error.message
    assert error.ref is None


@pytest.mark.parametrize("type_value", [5, None, True, ["join"], {"t": "join"}])
def test_decode_refuses_type_that_is_not_a_string(type_value):
    error = refused(dumps({"type": type_value, "room": "r1"}))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.ref is None


@pytest.mark.parametrize("type_value", ["nope", "JOIN", "message", "joined", "message.sent", ""])
def test_decode_refuses_unknown_type(type_value):
    error = refused(dumps({"type": type_value, "room": "r1"}))
    assert error.code is ErrorCode.BAD_REQUEST
    if type_value:
        assert "unknown frame type" in error.message
        assert error.ref == type_value


@pytest.mark.parametrize("frame_type", ["join", "leave", "message.send"])
def test_decode_refuses_missing_room(frame_type):
    obj = {"type": frame_type, "body": "hi"}
    error = refused(dumps(obj))
    assert error.code is ErrorCode.BAD_REQUEST
    assert "room" in error.message
    assert error.ref == frame_type


@pytest.mark.parametrize("frame_type", ["join", "leave", "message.send"])
@pytest.mark.parametrize("room", [5, None, True, ["r1"], {"id": "r1"}, 1.5])
def test_decode_refuses_room_that_is_not_a_string(frame_type, room):
    error = refused(dumps({"type": frame_type, "room": room, "body": "hi"}))
    assert error.code is ErrorCode.BAD_REQUEST
    assert "room" in error.message
    assert error.ref == frame_type


def test_decode_refuses_message_send_without_body():
    error = refused('{"type":"message.send","room":"r1","client_msg_id":"c-1"}')
    assert error.code is ErrorCode.BAD_REQUEST
    assert "body" in error.message
    assert error.ref == "c-1"


@pytest.mark.parametrize("body", [5, None, True, ["hi"], {"text": "hi"}, 1.5])
def test_decode_refuses_body_that_is_not_a_string(body):
    error = refused(dumps({"type": "message.send", "room": "r1", "body": body}))
    assert error.code is ErrorCode.BAD_REQUEST
    assert "body" in error.message
    assert error.ref == "message.send"


@pytest.mark.parametrize(
    "since",
    [-1, -41, 41.0, 41.5, True, False, "41", [41], {"seq": 41}],
    ids=["minus-one", "negative", "float-integral", "float", "true", "false", "string", "list", "object"],
)
def test_decode_refuses_join_with_bad_since(since):
    error = refused(dumps({"type": "join", "room": "r1", "since": since}))
    assert error.code is ErrorCode.BAD_REQUEST
    assert "since" in error.message
    assert error.ref == "join"


@pytest.mark.parametrize(
    "client_msg_id",
    ["", "c" * 65, 5, True, ["c-1"], {"id": "c-1"}, 1.5],
    ids=["empty", "65-chars", "int", "bool", "list", "object", "float"],
)
def test_decode_refuses_message_send_with_bad_client_msg_id(client_msg_id):
    error = refused(dumps({"type": "message.send", "room": "r1", "body": "hi", "client_msg_id": client_msg_id}))
    assert error.code is ErrorCode.BAD_REQUEST
    assert "client_msg_id" in error.message


# ---- room id rules (PROTOCOL.md 1) -----------------------------------------------

VALID_ROOMS = ["r1", "a", "a" * 128, "ABCxyz019", "team-1", "a_b", "a.b", "a:b", "-", ".", ":", "_", "A-Za-z0-9_.:-"]
INVALID_ROOMS = [
    "",
    "a" * 129,
    "a b",
    " r1",
    "r1 ",
    "a/b",
    "a\\b",
    "r\u00e9",
    "\u65e5\u672c",
    "\U0001f600",
    "a*",
    "team-*",
    "a#b",
    "a\tb",
    "\nr1",
    "r1\n",  # `$` in a pattern matches before a trailing newline; the rule must not
    "a" * 128 + "\n",
]


@pytest.mark.parametrize("room", VALID_ROOMS)
def test_room_id_of_allowed_characters_is_valid(room):
    assert is_valid_room_id(room)


@pytest.mark.parametrize("room", VALID_ROOMS)
@pytest.mark.parametrize("frame_type", ["join", "leave", "message.send"])
def test_decode_accepts_every_valid_room_id(frame_type, room):
    frame = decode_client_frame(dumps({"type": frame_type, "room": room, "body": "hi"}))
    assert frame.room == room


@pytest.mark.parametrize("room", INVALID_ROOMS)
def test_room_id_outside_the_rules_is_invalid(room):
    assert not is_valid_room_id(room)


@pytest.mark.parametrize("room", INVALID_ROOMS)
@pytest.mark.parametrize("frame_type", ["join", "leave", "message.send"])
def test_decode_refuses_room_id_outside_the_rules(frame_type, room):
    error = refused(dumps({"type": frame_type, "room": room, "body": "hi"}))
    assert error.code is ErrorCode.BAD_REQUEST
    assert error.message == "room must be 1 to 128 characters of A-Z a-z 0-9 _ . : -"
    assert error.ref == frame_type


# ---- ref: client_msg_id, else type (PROTOCOL.md 3) ------------------------------


def test_ref_echoes_client_msg_id_when_the_frame_has_one():
    error = refused(dumps({"type": "message.send", "room": "bad room", "body": "hi", "client_msg_id": "c-7"}))
    assert error.ref == "c-7"


def test_ref_echoes_client_msg_id_even_without_a_type():
    error = refused(dumps({"room": "r1", "client_msg_id": "c-8"}))
    assert error.ref == "c-8"


def test_ref_echoes_type_when_there_is_no_client_msg_id():
    error = refused(dumps({"type": "message.send", "room": "r1", "body": 5}))
    assert error.ref == "message.send"


def test_ref_falls_back_to_type_when_client_msg_id_is_not_a_string():
    error = refused(dumps({"type": "message.send", "room": "r1", "body": "hi", "client_msg_id": 9}))
    assert error.ref == "message.send"


def test_ref_falls_back_to_type_when_client_msg_id_is_empty():
    error = refused(dumps({"type": "message.send", "room": "r1", "body": "hi", "client_msg_id": ""}))
    assert error.ref == "message.send"


def test_ref_is_none_when_frame_has_neither_client_msg_id_nor_type():
    assert refused('{"room":"r1"}').ref is None


def test_ref_is_none_for_text_that_is_not_json():
    assert refused("{nope").ref is None


# ---- inputs that must not escape as exceptions ------------------------------------


def test_decode_refuses_deeply_nested_array_as_bad_request():
    text = "[" * 60_000  # 60 KB: under the default max_frame_bytes of 64 KiB
    error = refused(text)
    assert error.code is ErrorCode.BAD_REQUEST


def test_decode_ignores_or_refuses_deeply_nested_unknown_field_without_raising():
    depth = 20_000
    text = '{"type":"join","room":"r1","x":' + "[" * depth + "]" * depth + "}"
    try:
        frame = decode_client_frame(text)
    except FrameError as error:
        assert error.code is ErrorCode.BAD_REQUEST
    else:
        assert frame == Join("r1")


def test_decode_refuses_str_with_a_lone_surrogate_as_bad_request():
    # Not from the wire (text frames are strict UTF-8), but decode takes any str.
    error = refused('{"type":"join","room":"\ud800"}')
    assert error.code is ErrorCode.BAD_REQUEST


# ---- server frames (PROTOCOL.md 3) ---------------------------------------------------


def test_encode_joined_omits_recovered_when_true():
    assert encode_joined("r1", 57) == b'{"type":"joined","room":"r1","seq":57}'
    assert encode_joined("r1", 57, recovered=True) == b'{"type":"joined","room":"r1","seq":57}'


def test_encode_joined_writes_recovered_false():
    data = encode_joined("r1", 57, recovered=False)
    assert json.loads(data) == {"type": "joined", "room": "r1", "seq": 57, "recovered": False}


def test_encode_joined_of_an_empty_room_has_seq_zero():
    assert json.loads(encode_joined("r1", 0)) == {"type": "joined", "room": "r1", "seq": 0}


def test_encode_left():
    assert json.loads(encode_left("r1")) == {"type": "left", "room": "r1"}


def test_encode_ack():
    assert json.loads(encode_ack("c-1")) == {"type": "ack", "client_msg_id": "c-1"}


@pytest.mark.parametrize("code", list(ErrorCode))
def test_encode_error_has_type_code_message_and_ref(code):
    data = json.loads(encode_error(code, "slow down", "c-1"))
    assert data == {"type": "error", "code": code.value, "message": "slow down", "ref": "c-1"}
    assert list(data) == ["type", "code", "message", "ref"]


def test_encode_error_without_ref_writes_null_ref():
    data = json.loads(encode_error(ErrorCode.BAD_REQUEST, "frame is not valid JSON"))
    assert data == {"type": "error", "code": "bad_request", "message": "frame is not valid JSON", "ref": None}


def test_error_codes_are_the_protocol_strings():
    assert {c.value for c in ErrorCode} == {"bad_request", "forbidden", "too_large", "rate_limited", "unavailable"}


def test_server_frames_escape_json_special_characters():
    data = encode_error(ErrorCode.FORBIDDEN, 'room "x"\n is \\ not allowed', 'c-"1"')
    assert json.loads(data)["message"] == 'room "x"\n is \\ not allowed'
    assert json.loads(data)["ref"] == 'c-"1"'


# ---- the message envelope (PROTOCOL.md 4) ---------------------------------------


def test_message_envelope_is_head_plus_payload_plus_tail():
    payload = b'{"id":"01J","room":"r1","seq":58,"user":"alice","body":"hi","client_msg_id":"c-1","ts":1}'
    assert MESSAGE_ENVELOPE_HEAD == b'{"type":"message","data":'
    assert MESSAGE_ENVELOPE_TAIL == b"}"
    assert message_envelope(payload) == b'{"type":"message","data":' + payload + b"}"


def test_message_envelope_keeps_payload_bytes_unchanged():
    # Odd spacing, key order, an extra field and escapes: written exactly as published.
    payload = b'{ "seq" : 3,"room":"r1","extra":{"k":[1,2]},"body":"\\u00e9\\n" }'
    envelope = message_envelope(payload)
    assert envelope[len(MESSAGE_ENVELOPE_HEAD) : -len(MESSAGE_ENVELOPE_TAIL)] == payload
    assert json.loads(envelope) == {"type": "message", "data": json.loads(payload)}
