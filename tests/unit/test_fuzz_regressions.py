"""Inputs the fuzz targets (tests/fuzz/) broke, kept as plain tests.

Each test gives the input as the fuzzer or a corpus edge case found it (when
short enough to read) or a hand-reduced form, and the behaviour the fix
pins: a clear, documented error, never an unhandled exception.
"""

from __future__ import annotations

import json
import logging

import msgspec
import pytest

from gateway.adapters.redis_sub import _SubscriberProtocol
from gateway.adapters.resp_push import PushRead, PushReader
from gateway.core.session import JoinRoom, Reply, Session, SessionLimits
from gateway.core.rooms import RoomRegistry
from roomcast.wire.events import decode_event, decode_event_seq, decode_ingest, decode_optional_seq
from roomcast.wire.frames import FrameError, decode_client_frame
from tests.fuzz.common import load_check


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def array(*items: bytes) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(items)


MESSAGE_A1 = array(bulk(b"message"), bulk(b"room:a"), bulk(b"1"))


# ---- ingest_decoder: msgspec raised what the decoders do not document ------------


@pytest.mark.parametrize("decode", [decode_ingest, decode_event, decode_event_seq])
def test_decoders_refuse_a_str_with_a_lone_surrogate_with_decode_error(decode):
    # Fuzzer input b"\x85", passed as str by the harness as "\udc85":
    # msgspec raised UnicodeEncodeError.
    with pytest.raises(msgspec.DecodeError, match="not JSON"):
        decode("\udc85")
    with pytest.raises(msgspec.DecodeError):
        decode('{"seq":1}\ud800')


@pytest.mark.parametrize("decode", [decode_ingest, decode_event, decode_event_seq, decode_optional_seq])
def test_decoders_refuse_absurd_nesting_in_a_skipped_field_with_decode_error(decode):
    # Corpus edge case ingest_decoder/deep-nesting-ignored-field: msgspec
    # raised RecursionError even though it skips the field.
    payload = b'{"seq":1,"x":' + b"[" * 1100 + b"]" * 1100 + b"}"
    with pytest.raises(msgspec.DecodeError, match="not JSON"):
        decode(payload)


def test_decode_event_seq_still_reads_seq_past_unknown_fields():
    assert decode_event_seq(b'{"x":[[1]],"seq":5}') == 5


# ---- session: bytes that are not UTF-8 inside a field msgspec skips ----------------

FOUND_SESSION_FRAME = b'{"type":"message.send","room":"r1","bo\xfe\xff\xff\xff\xff\xffroom":"r1","body":"a"}'


def test_client_frame_with_invalid_utf8_in_a_skipped_key_is_refused():
    # The fuzzer's frame: msgspec skipped the unknown key without checking its
    # UTF-8 and the session posted the message.
    with pytest.raises(FrameError, match="not valid UTF-8") as refused:
        decode_client_frame(FOUND_SESSION_FRAME)
    assert refused.value.code.value == "bad_request"
    with pytest.raises(FrameError):
        decode_client_frame(b'{"type":"join","room":"r1","x":"\xff"}')


def test_session_answers_an_invalid_utf8_frame_with_an_error_reply():
    session = Session("u1", "gw", SessionLimits(), lambda: "id-1")
    actions = session.receive_text(0, FOUND_SESSION_FRAME)
    assert len(actions) == 1 and isinstance(actions[0], Reply)
    assert json.loads(actions[0].payload)["code"] == "bad_request"
    # Valid UTF-8 bytes are still accepted.
    assert session.receive_text(0, b'{"type":"join","room":"r1","x":"\xc3\xa9"}') == [JoinRoom("r1", None)]


# ---- resp_reader: hiredis replies of a shape the subscriber did not expect ---------


def read_all(stream: bytes) -> PushRead:
    return PushReader().read(bytearray(stream), len(stream))


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(array(bulk(b"message"), bulk(b"room:a")), id="message-without-payload"),
        pytest.param(array(bulk(b"message"), b":7\r\n", bulk(b"x")), id="integer-channel"),
        pytest.param(array(bulk(b"smessage"), array(bulk(b"c")), bulk(b"x")), id="array-channel"),
        pytest.param(array(bulk(b"message"), bulk(b"room:a"), array()), id="array-payload"),
        pytest.param(array(bulk(b"subscribe")), id="subscribe-without-channel"),
        pytest.param(array(bulk(b"subscribe"), b"$-1\r\n", b":1\r\n"), id="null-channel"),
    ],
)
def test_wrong_shaped_push_is_skipped_and_counted_not_raised(reply):
    # Before: IndexError or TypeError (unhashable channel) out of buffer_updated,
    # losing every message of the read.
    read = read_all(MESSAGE_A1 + reply + MESSAGE_A1)
    assert read.messages == {b"room:a": [b"1", b"1"]}
    assert read.malformed == 1 and read.protocol_error is None


def test_empty_array_is_ignored():
    # Fuzzer input resp-c3 ("*0\r\n" among valid replies): IndexError.
    read = read_all(array() + MESSAGE_A1)
    assert read.messages == {b"room:a": [b"1"]} and read.malformed == 0


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(b"\n", id="not-a-reply-type"),
        # Fuzzer input resp-c1, reduced: a RESP3 map whose key is an array
        # makes hiredis raise TypeError (unhashable) from gets().
        pytest.param(b"%1\r\n*1\r\n:1\r\n:2\r\n", id="map-keyed-by-array"),
    ],
)
def test_unparseable_stream_ends_the_read_with_protocol_error_keeping_what_came_before(bad):
    reader = PushReader()
    stream = MESSAGE_A1 + bad + MESSAGE_A1
    read = reader.read(bytearray(stream), len(stream))
    assert read.messages == {b"room:a": [b"1"]}
    assert read.protocol_error
    # hiredis cannot resynchronise: nothing more is read on this connection.
    later = reader.read(bytearray(MESSAGE_A1), len(MESSAGE_A1))
    assert later == PushRead(protocol_error=read.protocol_error)


class _FakeTransport:
    aborted = False

    def abort(self) -> None:
        self.aborted = True


class _FakeOwner:
    def __init__(self) -> None:
        self.batches: list[dict[bytes, list[bytes]]] = []
        self.confirmed: list[bytes] = []

    def on_messages(self, batch: dict[bytes, list[bytes]]) -> None:
        self.batches.append(batch)

    def _confirmed(self, channel: bytes) -> None:
        self.confirmed.append(channel)


def test_subscriber_delivers_the_read_then_drops_a_connection_that_stopped_speaking_resp(caplog):
    owner = _FakeOwner()
    protocol = _SubscriberProtocol(owner)  # type: ignore[arg-type]
    transport = _FakeTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    stream = array(bulk(b"subscribe"), bulk(b"room:a"), b":1\r\n") + MESSAGE_A1 + array() + b"\n"
    protocol.buffer[: len(stream)] = stream
    with caplog.at_level(logging.ERROR, logger="roomcast.gateway.redis"):
        protocol.buffer_updated(len(stream))
    assert owner.confirmed == [b"room:a"]
    assert owner.batches == [{b"room:a": [b"1"]}]
    assert transport.aborted
    assert "not RESP" in caplog.text


# ---- every crash input as the fuzzer wrote it, through its harness ------------------

FOUND = [
    ("ingest_decoder", b"\x85"),
    ("session", FOUND_SESSION_FRAME),
    ("resp_reader", b"\x05\x08%3\r\n$7\r\nmess\x01\x00\x00\x00\n$6\r\nroom:a\r\n$1\r\n1\r\n*3\r\n$7\r\nmessage\r\n$6\r\nroom:b\r\n$1\r\n2\r\n"),
    ("resp_reader", b")G*2\r\n*1\r\n*1\r\n$1\r\nx\x11\x1d-MOVED 399:1\r\n*0\r\n$1\r\nx\x11\x1d-MOVED3\x181\r\n"),
    ("resp_reader", b"\x01\x00*-,\r\n:1\r\n*0\r\n$1\r\nx\r\n"),
]


@pytest.mark.parametrize(("target", "data"), FOUND, ids=[f"{t}-{i}" for i, (t, _) in enumerate(FOUND)])
def test_found_input_passes_its_harness(target, data):
    load_check(target)(data)


# ---- ingest_decoder after the merge of main: the fan-out's optional-seq decoder ----

DEEP_EVENT = b'{"seq":3,"x":' + b"[" * 1100 + b"]" * 1100 + b"}"


def test_decode_optional_seq_refuses_absurd_nesting_with_decode_error():
    # Corpus edge case ingest_decoder/deep-nesting-ignored-field once the
    # harness covered decode_optional_seq: RecursionError.
    with pytest.raises(msgspec.DecodeError, match="not JSON"):
        decode_optional_seq(DEEP_EVENT)
    assert decode_optional_seq(b'{"x":[[1]]}') is None


def test_fan_out_counts_an_absurdly_nested_event_as_malformed_and_delivers_the_rest():
    # Before: RecursionError out of RoomRegistry.deliver (its steady-state
    # path and decode_optional_seq), so the subscriber lost the whole read,
    # every room's messages in it, to one bad payload on one room's channel.
    from gateway.core.rooms import frame_events
    from tests.support import event

    registry = RoomRegistry()
    room, _ = registry.begin_join("r1", "m1")
    registry.complete_join(room, "m1", lambda data: None, sent_up_to=0)
    registry.deliver(room, [event("r1", 1), DEEP_EVENT, event("r1", 2)])
    (delivery,) = registry.outbox
    assert delivery.buffer == frame_events([event("r1", 1), event("r1", 2)])
    assert registry.stats.events_malformed == 1
