"""Server text frames built once (RFC 6455 section 5.2) and concatenated message frames."""

from __future__ import annotations

import json
import struct

import pytest

from gateway.core.rooms import frame_events
from gateway.core.server_frames import text_frame, text_frame_header
from roomcast.wire.frames import message_envelope


def parse_frames(buffer: bytes) -> list[tuple[int, int, bytes]]:
    """(fin_rsv_opcode byte, mask bit, payload) of each frame in buffer; fails on a truncated one.

    A reading of RFC 6455 5.2 independent of the code under test.
    """
    frames = []
    i = 0
    while i < len(buffer):
        b0, b1 = buffer[i], buffer[i + 1]
        masked = b1 >> 7
        length = b1 & 0x7F
        i += 2
        if length == 126:
            (length,) = struct.unpack_from("!H", buffer, i)
            assert length >= 126, "16-bit length used for a length that fits in 7 bits"
            i += 2
        elif length == 127:
            (length,) = struct.unpack_from("!Q", buffer, i)
            assert length >> 63 == 0, "most significant bit of a 64-bit length must be 0"
            assert length >= 65536, "64-bit length used for a length that fits in 16 bits"
            i += 8
        if masked:
            i += 4
        assert i + length <= len(buffer), "truncated frame"
        frames.append((b0, masked, buffer[i : i + length]))
        i += length
    return frames


# ---- headers, byte by byte ----------------------------------------------------------


def test_header_of_empty_payload_is_two_bytes():
    assert text_frame_header(0) == bytes([0x81, 0x00])


def test_header_of_125_bytes_uses_the_7_bit_length():
    assert text_frame_header(125) == bytes([0x81, 0x7D])


def test_header_of_126_bytes_uses_the_16_bit_length():
    assert text_frame_header(126) == bytes([0x81, 0x7E, 0x00, 0x7E])


def test_header_of_65535_bytes_uses_the_16_bit_length():
    assert text_frame_header(65535) == bytes([0x81, 0x7E, 0xFF, 0xFF])


def test_header_of_65536_bytes_uses_the_64_bit_length():
    assert text_frame_header(65536) == bytes([0x81, 0x7F, 0, 0, 0, 0, 0, 0x01, 0x00, 0x00])


def test_header_of_a_large_payload_is_big_endian():
    assert text_frame_header(0x0102030405) == bytes([0x81, 0x7F, 0, 0, 0, 0x01, 0x02, 0x03, 0x04, 0x05])


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 1 << 20])
def test_header_is_a_final_unmasked_text_frame(length):
    header = text_frame_header(length)
    b0, b1 = header[0], header[1]
    assert b0 & 0x80, "FIN must be set"
    assert b0 & 0x70 == 0, "RSV1-3 must be clear"
    assert b0 & 0x0F == 0x1, "opcode must be text"
    assert b1 & 0x80 == 0, "server frames are never masked (RFC 6455 5.1)"
    assert len(header) == (2 if length < 126 else 4 if length < 65536 else 10)


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_parses_back_to_its_payload(length):
    payload = bytes(i % 251 for i in range(length))
    data = text_frame(payload)
    assert data == text_frame_header(length) + payload
    assert parse_frames(data) == [(0x81, 0, payload)]


# ---- frame_events: the message frames of a batch in one buffer --------------------


def event(seq: int, body: str = "hi") -> bytes:
    return json.dumps({"id": f"e{seq}", "room": "r1", "seq": seq, "user": "u", "body": body, "client_msg_id": f"c{seq}", "ts": 1}).encode()


def test_frame_events_of_no_events_is_empty():
    assert frame_events([]) == b""


def test_frame_events_of_one_event_is_one_message_frame():
    payload = event(1)
    assert frame_events([payload]) == text_frame(message_envelope(payload))


def test_frame_events_concatenates_one_frame_per_event_in_order():
    payloads = [event(1), event(2, "x" * 200), event(3, "y" * 70_000), event(4, "")]
    buffer = frame_events(payloads)
    assert buffer == b"".join(text_frame(message_envelope(p)) for p in payloads)
    frames = parse_frames(buffer)
    assert [f[0] for f in frames] == [0x81] * 4
    assert [f[2] for f in frames] == [message_envelope(p) for p in payloads]
    assert [json.loads(f[2])["data"]["seq"] for f in frames] == [1, 2, 3, 4]


@pytest.mark.parametrize("envelope_len", [125, 126, 65535, 65536])
def test_frame_events_picks_the_header_from_the_envelope_length(envelope_len):
    overhead = len(message_envelope(b""))
    payload = b'"' + b"a" * (envelope_len - overhead - 2) + b'"'
    buffer = frame_events([payload])
    assert buffer[: len(text_frame_header(envelope_len))] == text_frame_header(envelope_len)
    assert parse_frames(buffer) == [(0x81, 0, message_envelope(payload))]


def test_frame_events_writes_payload_bytes_unchanged():
    payload = b'{ "seq":5 , "extra":"\\u00e9" }'
    [(_, _, data)] = parse_frames(frame_events([payload]))
    assert data == b'{"type":"message","data":' + payload + b"}"
