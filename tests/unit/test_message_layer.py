"""The WebSocket message layer (gateway.core.message_layer), without a socket.

Each test names the RFC 6455 rule it pins; the frames are what picows would
hand the layer: opcode, fin, the three RSV bits and the unmasked payload.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from gateway.core import message_layer as framing
from gateway.core.message_layer import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    BinaryMessage,
    Fail,
    MessageAssembler,
    PeerClose,
    SendPong,
    TextMessage,
    is_valid_close_code,
)

LIMIT = 1024


def feed(
    assembler: MessageAssembler,
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv1: bool = False,
    rsv2: bool = False,
    rsv3: bool = False,
) -> framing.Outcome | None:
    return assembler.feed(opcode, fin, rsv1, rsv2, rsv3, payload)


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


@pytest.fixture
def assembler() -> MessageAssembler:
    return MessageAssembler(max_message_bytes=LIMIT)


# -- whole messages ------------------------------------------------------


def test_single_text_frame_is_delivered_as_a_text_message(assembler: MessageAssembler) -> None:
    assert feed(assembler, OP_TEXT, "héllo".encode()) == TextMessage("héllo")


def test_single_binary_frame_is_delivered_as_a_binary_message(assembler: MessageAssembler) -> None:
    assert feed(assembler, OP_BINARY, b"\x00\xff") == BinaryMessage(b"\x00\xff")


def test_empty_text_and_binary_frames_are_empty_messages(assembler: MessageAssembler) -> None:
    assert feed(assembler, OP_TEXT) == TextMessage("")
    assert feed(assembler, OP_BINARY) == BinaryMessage(b"")


def test_text_frame_with_invalid_utf8_fails_with_1007(assembler: MessageAssembler) -> None:
    # RFC 6455 8.1: a text message that is not UTF-8 fails the connection.
    outcome = feed(assembler, OP_TEXT, b"ok \xc3\x28")
    assert isinstance(outcome, Fail) and outcome.code == 1007


@pytest.mark.parametrize(
    "payload",
    [b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\xff"],
    ids=["surrogate", "above-10ffff", "overlong", "invalid-byte"],
)
def test_text_frame_with_forbidden_utf8_forms_fails_with_1007(assembler: MessageAssembler, payload: bytes) -> None:
    outcome = feed(assembler, OP_TEXT, payload)
    assert isinstance(outcome, Fail) and outcome.code == 1007


def test_hot_path_text_message_is_the_same_value_as_one_built_normally(assembler: MessageAssembler) -> None:
    # The hot path builds TextMessage without its __init__; it must still be
    # an ordinary frozen TextMessage.
    message = feed(assembler, OP_TEXT, b"hi")
    assert type(message) is TextMessage
    assert message == TextMessage("hi")
    assert hash(message) == hash(TextMessage("hi"))
    assert repr(message) == "TextMessage(text='hi')"
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.text = "changed"  # type: ignore[misc]


def test_single_text_frames_take_the_hot_path_also_after_a_fragmented_message(
    assembler: MessageAssembler, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The hot path is a performance contract: a whole text frame never
    # reaches the general path, before or after a fragmented message.
    assert feed(assembler, OP_TEXT, b"a", fin=False) is None
    assert feed(assembler, OP_CONTINUATION, b"b") == TextMessage("ab")

    def general_path(*args: object) -> None:
        raise AssertionError("single text frame left the hot path")

    monkeypatch.setattr(MessageAssembler, "_feed_slow", general_path)
    assert feed(assembler, OP_TEXT, b"c") == TextMessage("c")


@pytest.mark.parametrize("cls", [TextMessage, BinaryMessage, SendPong, Fail, PeerClose])
def test_outcomes_are_frozen_slotted_dataclasses_exported_in_all(cls: type) -> None:
    assert dataclasses.is_dataclass(cls)
    assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert "__slots__" in cls.__dict__
    assert cls.__name__ in framing.__all__


def test_framing_module_imports_no_event_loop_or_websocket_library() -> None:
    # The core is sans-I/O: importing it must not pull in asyncio or picows.
    code = (
        "import sys, gateway.core.message_layer; "
        "bad = [m for m in ('asyncio', 'picows', 'uvloop') if m in sys.modules]; "
        "sys.exit(repr(bad) if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


# -- fragmentation (RFC 6455 5.4) ------------------------------------------


def test_fragmented_text_is_delivered_once_the_final_fragment_arrives(assembler: MessageAssembler) -> None:
    assert feed(assembler, OP_TEXT, b"hel", fin=False) is None
    assert feed(assembler, OP_CONTINUATION, b"lo ", fin=False) is None
    assert feed(assembler, OP_CONTINUATION, b"world") == TextMessage("hello world")


def test_fragmented_binary_is_joined_in_order(assembler: MessageAssembler) -> None:
    assert feed(assembler, OP_BINARY, b"\x01", fin=False) is None
    assert feed(assembler, OP_CONTINUATION, b"\x02", fin=False) is None
    assert feed(assembler, OP_CONTINUATION, b"\x03") == BinaryMessage(b"\x01\x02\x03")


def test_fragmented_message_of_empty_fragments_is_an_empty_message(assembler: MessageAssembler) -> None:
    assert feed(assembler, OP_TEXT, fin=False) is None
    assert feed(assembler, OP_CONTINUATION, fin=False) is None
    assert feed(assembler, OP_CONTINUATION) == TextMessage("")


def test_utf8_character_split_across_fragments_is_reassembled(assembler: MessageAssembler) -> None:
    encoded = "κόσμε".encode()
    assert feed(assembler, OP_TEXT, encoded[:1], fin=False) is None
    assert feed(assembler, OP_CONTINUATION, encoded[1:4], fin=False) is None
    assert feed(assembler, OP_CONTINUATION, encoded[4:]) == TextMessage("κόσμε")


def test_fragmented_text_with_invalid_utf8_fails_at_the_bad_fragment_with_1007(assembler: MessageAssembler) -> None:
    # Autobahn 6.4.1: fail fast, without waiting for the final fragment.
    assert feed(assembler, OP_TEXT, "κόσμε".encode(), fin=False) is None
    outcome = feed(assembler, OP_CONTINUATION, b"\xf4\x90\x80\x80", fin=False)
    assert isinstance(outcome, Fail) and outcome.code == 1007


def test_fragment_ending_in_half_a_surrogate_fails_at_that_fragment_with_1007(assembler: MessageAssembler) -> None:
    # ED A0 can only start a UTF-16 surrogate, never valid UTF-8; CPython's
    # incremental decoder would wait for a third byte.
    assert feed(assembler, OP_TEXT, b"ok", fin=False) is None
    outcome = feed(assembler, OP_CONTINUATION, b"\xed\xa0", fin=False)
    assert isinstance(outcome, Fail) and outcome.code == 1007


def test_fragment_ending_in_a_valid_prefix_waits_for_the_next_fragment(assembler: MessageAssembler) -> None:
    # ED 9F is the start of U+D7FF, valid: no early failure.
    assert feed(assembler, OP_TEXT, b"\xed\x9f", fin=False) is None
    assert feed(assembler, OP_CONTINUATION, b"\xbf") == TextMessage("\ud7ff")


def test_text_ending_in_a_truncated_character_fails_at_the_final_fragment_with_1007(
    assembler: MessageAssembler,
) -> None:
    assert feed(assembler, OP_TEXT, b"ok", fin=False) is None
    outcome = feed(assembler, OP_CONTINUATION, b"\xe2\x82")
    assert isinstance(outcome, Fail) and outcome.code == 1007


def test_continuation_without_a_message_to_continue_fails_with_1002(assembler: MessageAssembler) -> None:
    outcome = feed(assembler, OP_CONTINUATION, b"orphan")
    assert isinstance(outcome, Fail) and outcome.code == 1002


def test_continuation_after_a_completed_message_fails_with_1002(assembler: MessageAssembler) -> None:
    assert feed(assembler, OP_TEXT, b"a", fin=False) is None
    assert feed(assembler, OP_CONTINUATION, b"b") == TextMessage("ab")
    outcome = feed(assembler, OP_CONTINUATION, b"c")
    assert isinstance(outcome, Fail) and outcome.code == 1002


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
@pytest.mark.parametrize("fin", [True, False])
def test_new_data_frame_inside_a_fragmented_message_fails_with_1002(
    assembler: MessageAssembler, opcode: int, fin: bool
) -> None:
    assert feed(assembler, OP_TEXT, b"first", fin=False) is None
    outcome = feed(assembler, opcode, b"second", fin=fin)
    assert isinstance(outcome, Fail) and outcome.code == 1002


def test_ping_between_fragments_is_answered_and_the_message_still_completes(assembler: MessageAssembler) -> None:
    assert feed(assembler, OP_TEXT, b"frag", fin=False) is None
    assert feed(assembler, OP_PING, b"p") == SendPong(b"p")
    assert feed(assembler, OP_CONTINUATION, b"ment") == TextMessage("fragment")


def test_pong_between_fragments_is_ignored_and_the_message_still_completes(assembler: MessageAssembler) -> None:
    assert feed(assembler, OP_BINARY, b"\x01", fin=False) is None
    assert feed(assembler, OP_PONG, b"unsolicited") is None
    assert feed(assembler, OP_CONTINUATION, b"\x02") == BinaryMessage(b"\x01\x02")


def test_close_between_fragments_closes_and_drops_the_partial_message(assembler: MessageAssembler) -> None:
    assert feed(assembler, OP_TEXT, b"half", fin=False) is None
    assert feed(assembler, OP_CLOSE, close_payload(1000)) == PeerClose(1000, "")
    assert feed(assembler, OP_CONTINUATION, b" more") is None


def test_single_frame_message_after_a_fragmented_one_is_delivered(assembler: MessageAssembler) -> None:
    assert feed(assembler, OP_TEXT, b"a", fin=False) is None
    assert feed(assembler, OP_CONTINUATION, b"b") == TextMessage("ab")
    assert feed(assembler, OP_TEXT, b"c") == TextMessage("c")
    assert feed(assembler, OP_BINARY, b"d") == BinaryMessage(b"d")


# -- reserved bits and opcodes (RFC 6455 5.2) ----------------------------------


@pytest.mark.parametrize("bit", ["rsv1", "rsv2", "rsv3"])
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY, OP_PING, OP_PONG, OP_CLOSE])
def test_frame_with_a_reserved_bit_set_fails_with_1002(assembler: MessageAssembler, bit: str, opcode: int) -> None:
    outcome = feed(assembler, opcode, b"", **{bit: True})
    assert isinstance(outcome, Fail) and outcome.code == 1002


@pytest.mark.parametrize("bit", ["rsv1", "rsv2", "rsv3"])
def test_continuation_with_a_reserved_bit_set_fails_with_1002(assembler: MessageAssembler, bit: str) -> None:
    assert feed(assembler, OP_TEXT, b"a", fin=False) is None
    outcome = feed(assembler, OP_CONTINUATION, b"b", **{bit: True})
    assert isinstance(outcome, Fail) and outcome.code == 1002


@pytest.mark.parametrize("opcode", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_reserved_opcode_fails_with_1002(assembler: MessageAssembler, opcode: int) -> None:
    outcome = feed(assembler, opcode, b"x")
    assert isinstance(outcome, Fail) and outcome.code == 1002


@pytest.mark.parametrize("opcode", [0x5, 0xB])
def test_reserved_opcode_between_fragments_fails_with_1002(assembler: MessageAssembler, opcode: int) -> None:
    assert feed(assembler, OP_TEXT, b"a", fin=False) is None
    outcome = feed(assembler, opcode)
    assert isinstance(outcome, Fail) and outcome.code == 1002


# -- control frames (RFC 6455 5.5) ---------------------------------------------


def test_ping_is_answered_with_a_pong_carrying_its_payload(assembler: MessageAssembler) -> None:
    assert feed(assembler, OP_PING, b"\x00abc") == SendPong(b"\x00abc")
    assert feed(assembler, OP_PING) == SendPong(b"")


def test_ping_with_125_bytes_is_answered(assembler: MessageAssembler) -> None:
    assert feed(assembler, OP_PING, b"x" * 125) == SendPong(b"x" * 125)


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_control_frame_with_126_bytes_fails_with_1002(assembler: MessageAssembler, opcode: int) -> None:
    payload = close_payload(1000, b"x" * 124) if opcode == OP_CLOSE else b"x" * 126
    outcome = feed(assembler, opcode, payload)
    assert isinstance(outcome, Fail) and outcome.code == 1002


@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_fragmented_control_frame_fails_with_1002(assembler: MessageAssembler, opcode: int) -> None:
    outcome = feed(assembler, opcode, b"", fin=False)
    assert isinstance(outcome, Fail) and outcome.code == 1002


def test_pong_needs_no_answer(assembler: MessageAssembler) -> None:
    assert feed(assembler, OP_PONG, b"whatever") is None
    assert feed(assembler, OP_TEXT, b"still open") == TextMessage("still open")


# -- close frames (RFC 6455 5.5.1, 7.4) ----------------------------------------


def test_empty_close_is_answered_with_1000(assembler: MessageAssembler) -> None:
    assert feed(assembler, OP_CLOSE) == PeerClose(1000, "")


def test_close_with_code_and_reason_is_answered_with_the_same_code_and_reason(assembler: MessageAssembler) -> None:
    assert feed(assembler, OP_CLOSE, close_payload(4001, "bye ✓".encode())) == PeerClose(4001, "bye ✓")


def test_close_with_a_one_byte_payload_fails_with_1002(assembler: MessageAssembler) -> None:
    outcome = feed(assembler, OP_CLOSE, b"\x03")
    assert isinstance(outcome, Fail) and outcome.code == 1002


@pytest.mark.parametrize(
    "code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999]
)
def test_close_with_a_valid_code_is_answered_with_that_code(assembler: MessageAssembler, code: int) -> None:
    assert feed(assembler, OP_CLOSE, close_payload(code)) == PeerClose(code, "")


@pytest.mark.parametrize(
    "code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]
)
def test_close_with_an_invalid_code_fails_with_1002(assembler: MessageAssembler, code: int) -> None:
    outcome = feed(assembler, OP_CLOSE, close_payload(code))
    assert isinstance(outcome, Fail) and outcome.code == 1002


def test_close_with_an_invalid_utf8_reason_fails_with_1007(assembler: MessageAssembler) -> None:
    outcome = feed(assembler, OP_CLOSE, close_payload(1000, b"\xce\xba\xe1\xbd\xb9\xed\xa0\x80"))
    assert isinstance(outcome, Fail) and outcome.code == 1007


@pytest.mark.parametrize(
    ("code", "valid"),
    [(999, False), (1000, True), (1003, True), (1004, False), (1006, False), (1007, True), (1014, True),
     (1015, False), (2999, False), (3000, True), (4999, True), (5000, False)],
)
def test_valid_close_codes_follow_rfc_6455_section_7_4(code: int, valid: bool) -> None:
    assert is_valid_close_code(code) is valid


# -- message size limit (1009) --------------------------------------------------


def test_text_frame_at_the_limit_is_delivered(assembler: MessageAssembler) -> None:
    assert feed(assembler, OP_TEXT, b"x" * LIMIT) == TextMessage("x" * LIMIT)


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_single_frame_over_the_limit_fails_with_1009(assembler: MessageAssembler, opcode: int) -> None:
    outcome = feed(assembler, opcode, b"x" * (LIMIT + 1))
    assert isinstance(outcome, Fail) and outcome.code == 1009


@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_fragmented_message_fails_with_1009_at_the_fragment_that_crosses_the_limit(
    assembler: MessageAssembler, opcode: int
) -> None:
    assert feed(assembler, opcode, b"x" * (LIMIT - 10), fin=False) is None
    assert feed(assembler, OP_CONTINUATION, b"x" * 10, fin=False) is None
    outcome = feed(assembler, OP_CONTINUATION, b"x", fin=False)
    assert isinstance(outcome, Fail) and outcome.code == 1009


def test_fragmented_message_exactly_at_the_limit_is_delivered(assembler: MessageAssembler) -> None:
    assert feed(assembler, OP_BINARY, b"x" * (LIMIT - 1), fin=False) is None
    assert feed(assembler, OP_CONTINUATION, b"y") == BinaryMessage(b"x" * (LIMIT - 1) + b"y")


def test_limit_counts_utf8_bytes_not_characters() -> None:
    assembler = MessageAssembler(max_message_bytes=4)
    assert feed(assembler, OP_TEXT, "éé".encode()) == TextMessage("éé")
    outcome = feed(assembler, OP_TEXT, "ééé".encode())
    assert isinstance(outcome, Fail) and outcome.code == 1009


def test_limit_of_zero_accepts_only_empty_messages() -> None:
    assembler = MessageAssembler(max_message_bytes=0)
    assert feed(assembler, OP_TEXT) == TextMessage("")
    outcome = feed(assembler, OP_BINARY, b"x")
    assert isinstance(outcome, Fail) and outcome.code == 1009


def test_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="max_message_bytes"):
        MessageAssembler(max_message_bytes=-1)


def test_max_message_bytes_is_reported_and_read_only(assembler: MessageAssembler) -> None:
    assert assembler.max_message_bytes == LIMIT
    with pytest.raises(AttributeError):
        assembler.max_message_bytes = 1  # type: ignore[misc]


# -- after a close or a failure (RFC 6455 5.5.1, 7.1.7) ------------------------

LATER_FRAMES = [
    (OP_TEXT, b"text", True),
    (OP_BINARY, b"bin", True),
    (OP_TEXT, b"frag", False),
    (OP_CONTINUATION, b"more", True),
    (OP_PING, b"p", True),
    (OP_PONG, b"p", True),
    (OP_CLOSE, close_payload(1000), True),
    (OP_CLOSE, b"\x03", True),
    (0x5, b"", True),
]


def assert_ignores_every_later_frame(assembler: MessageAssembler) -> None:
    assert assembler.closed
    for opcode, payload, fin in LATER_FRAMES:
        assert feed(assembler, opcode, payload, fin=fin) is None, opcode
    assert feed(assembler, OP_TEXT, b"x", rsv1=True) is None


def test_frames_after_the_peer_close_are_ignored(assembler: MessageAssembler) -> None:
    assert feed(assembler, OP_CLOSE, close_payload(1001)) == PeerClose(1001, "")
    assert_ignores_every_later_frame(assembler)


def test_frames_after_a_failure_are_ignored(assembler: MessageAssembler) -> None:
    assert isinstance(feed(assembler, OP_TEXT, b"\xff"), Fail)
    assert_ignores_every_later_frame(assembler)


def test_frames_after_a_failure_inside_a_fragmented_message_are_ignored(assembler: MessageAssembler) -> None:
    assert feed(assembler, OP_TEXT, b"a", fin=False) is None
    assert isinstance(feed(assembler, OP_CONTINUATION, b"\xff", fin=False), Fail)
    assert_ignores_every_later_frame(assembler)


def test_frames_after_close_is_called_are_ignored(assembler: MessageAssembler) -> None:
    assert not assembler.closed
    assembler.close()
    assert_ignores_every_later_frame(assembler)


def test_failure_reasons_fit_in_a_close_frame() -> None:
    # RFC 6455 5.5: code (2 bytes) + reason must fit in 125 bytes.
    cases: list[tuple[int, int, bytes, bool]] = [
        (LIMIT, OP_TEXT, b"\xff", True),
        (LIMIT, OP_CONTINUATION, b"", True),
        (LIMIT, 0xF, b"", True),
        (LIMIT, OP_PING, b"", False),
        (LIMIT, OP_PING, b"x" * 126, True),
        (LIMIT, OP_CLOSE, b"\x03", True),
        (LIMIT, OP_CLOSE, close_payload(65535), True),
        (LIMIT, OP_CLOSE, close_payload(1000, b"\xff"), True),
        (0, OP_BINARY, b"x", True),
    ]
    for limit, opcode, payload, fin in cases:
        outcome = MessageAssembler(max_message_bytes=limit).feed(opcode, fin, False, False, False, payload)
        assert isinstance(outcome, Fail), (opcode, payload[:8])
        assert len(outcome.reason.encode("ascii")) <= 123
