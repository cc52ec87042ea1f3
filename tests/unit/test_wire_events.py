"""Payloads between services (PROTOCOL.md section 4)."""

from __future__ import annotations

import json

import msgspec
import pytest

from roomcast.wire.events import (
    CHAT_GROUP,
    CREATED_TOPIC,
    GATEWAY_GROUP,
    INGEST_TOPIC,
    IngestRecord,
    MessageEvent,
    decode_event,
    decode_event_seq,
    decode_ingest,
    encode_event,
    encode_ingest,
    room_channel,
)

EVENT = MessageEvent(
    id="01JD0000000000000000000000",
    room="r1",
    seq=58,
    user="alice",
    body="hi \u00e9 \U0001f600",
    client_msg_id="c-1",
    ts=1732650000123,
)
RECORD = IngestRecord(
    room="r1",
    user="alice",
    body="hi \u20ac",
    client_msg_id="c-1",
    gateway="gw-1",
    received_at=1732650000100,
)


def test_message_event_round_trips():
    assert decode_event(encode_event(EVENT)) == EVENT


def test_message_event_decodes_from_str():
    assert decode_event(encode_event(EVENT).decode()) == EVENT


def test_message_event_has_exactly_the_protocol_fields():
    assert json.loads(encode_event(EVENT)) == {
        "id": "01JD0000000000000000000000",
        "room": "r1",
        "seq": 58,
        "user": "alice",
        "body": "hi \u00e9 \U0001f600",
        "client_msg_id": "c-1",
        "ts": 1732650000123,
    }


def test_ingest_record_round_trips():
    assert decode_ingest(encode_ingest(RECORD)) == RECORD


def test_ingest_record_has_exactly_the_protocol_fields():
    assert json.loads(encode_ingest(RECORD)) == {
        "room": "r1",
        "user": "alice",
        "body": "hi \u20ac",
        "client_msg_id": "c-1",
        "gateway": "gw-1",
        "received_at": 1732650000100,
    }


def test_decode_event_refuses_an_event_missing_a_field():
    data = json.loads(encode_event(EVENT))
    del data["ts"]
    with pytest.raises(msgspec.DecodeError):
        decode_event(json.dumps(data).encode())


def test_decode_event_refuses_a_mistyped_field():
    data = json.loads(encode_event(EVENT))
    data["seq"] = "58"
    with pytest.raises(ValueError):
        decode_event(json.dumps(data).encode())


def test_decode_ingest_refuses_a_record_missing_a_field():
    data = json.loads(encode_ingest(RECORD))
    del data["gateway"]
    with pytest.raises(msgspec.DecodeError):
        decode_ingest(json.dumps(data).encode())


def test_decode_event_refuses_text_that_is_not_json():
    with pytest.raises(ValueError):
        decode_event(b"{nope")


# ---- decode_event_seq: the fan-out path reads only seq ----------------------------


def test_decode_event_seq_reads_the_seq_of_a_full_event():
    assert decode_event_seq(encode_event(EVENT)) == 58


def test_decode_event_seq_needs_no_other_field():
    assert decode_event_seq(b'{"seq":7}') == 7


def test_decode_event_seq_tolerates_extra_fields_of_any_shape():
    payload = b'{"id":"x","extra":{"deep":[1,{"seq":"not this one"}]},"seq":9,"flag":true,"n":null,"f":1.5}'
    assert decode_event_seq(payload) == 9


def test_decode_event_seq_tolerates_mistyped_other_fields():
    # Only seq is read; a publisher's odd `ts` or `room` is not the gateway's business.
    assert decode_event_seq(b'{"seq":3,"room":5,"ts":"yesterday","body":null}') == 3


@pytest.mark.parametrize(
    "payload",
    [
        b'{"room":"r1","body":"hi"}',
        b"{}",
        b'{"seq":"5"}',
        b'{"seq":null}',
        b'{"seq":5.5}',
        b'{"seq":true}',
        b'{"data":{"seq":5}}',
        b"[5]",
        b"5",
        b"not json",
        b"",
    ],
    ids=["no-seq", "empty-object", "string-seq", "null-seq", "float-seq", "bool-seq", "nested-seq", "array", "number", "garbage", "empty"],
)
def test_decode_event_seq_raises_decode_error_on_payload_without_a_usable_seq(payload):
    with pytest.raises(msgspec.DecodeError):
        decode_event_seq(payload)


def test_decode_error_is_a_value_error():
    # rooms.deliver catches either; the docstrings promise a ValueError.
    assert issubclass(msgspec.DecodeError, ValueError)


# ---- names of PROTOCOL.md 4 --------------------------------------------------------


def test_room_channel_is_room_colon_id():
    assert room_channel("r1") == "room:r1"
    assert room_channel("team-a:b.c") == "room:team-a:b.c"


def test_topic_and_group_names_match_the_protocol():
    assert INGEST_TOPIC == "message.ingest"
    assert CREATED_TOPIC == "message.created"
    assert CHAT_GROUP == "chat-service"
    assert GATEWAY_GROUP == "realtime-gateway-group"
