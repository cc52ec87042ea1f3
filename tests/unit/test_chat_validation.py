"""chat.core.validation: what the chat service refuses to store (PROTOCOL.md 1-4)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import chat.core
from chat.core.validation import validate_ingest
from roomcast.wire.frames import is_valid_room_id
from roomcast.wire.events import IngestRecord


def record(**over: object) -> IngestRecord:
    fields: dict[str, object] = dict(room="r1", user="alice", body="hi", client_msg_id="c-1", gateway="gw", received_at=1)
    fields.update(over)
    return IngestRecord(**fields)  # type: ignore[arg-type]


def test_a_good_record_passes() -> None:
    assert validate_ingest(record()) is None


@pytest.mark.parametrize("room", ["r", "A-z_0.9:x", "a" * 128])
def test_room_ids_of_the_allowed_characters_pass(room: str) -> None:
    assert validate_ingest(record(room=room)) is None


@pytest.mark.parametrize("room", ["", "a" * 129, "r 1", "r/1", "é", "r1\n", "\nr1", "r1#"])
def test_room_id_outside_the_pattern_is_refused(room: str) -> None:
    assert "room" in (validate_ingest(record(room=room)) or "")
    assert not is_valid_room_id(room)


def test_empty_user_is_refused() -> None:
    assert validate_ingest(record(user="")) == "user is empty"


def test_empty_body_is_refused() -> None:
    assert validate_ingest(record(body="")) == "body is empty"


def test_body_limit_counts_utf8_bytes_not_characters() -> None:
    assert validate_ingest(record(body="x" * 4096)) is None
    assert "4097 bytes" in (validate_ingest(record(body="x" * 4097)) or "")
    # 1366 euro signs are 4098 bytes of UTF-8 but only 1366 characters.
    assert "over the limit" in (validate_ingest(record(body="€" * 1366)) or "")
    assert validate_ingest(record(body="€" * 1365)) is None


def test_body_limit_is_a_parameter() -> None:
    assert validate_ingest(record(body="x" * 11), max_body_bytes=10) is not None
    assert validate_ingest(record(body="x" * 10), max_body_bytes=10) is None


def test_body_that_is_not_utf8_encodable_is_refused() -> None:
    assert validate_ingest(record(body="a\ud800b")) == "body is not valid UTF-8"


@pytest.mark.parametrize("cmid", ["", "x" * 65])
def test_client_msg_id_outside_1_to_64_chars_is_refused(cmid: str) -> None:
    assert validate_ingest(record(client_msg_id=cmid)) == "client_msg_id must be 1 to 64 characters"


@pytest.mark.parametrize("cmid", ["x", "x" * 64])
def test_client_msg_id_of_1_to_64_chars_passes(cmid: str) -> None:
    assert validate_ingest(record(client_msg_id=cmid)) is None


def test_chat_core_imports_no_io_library() -> None:
    forbidden = {"asyncio", "aiokafka", "aiosqlite", "sqlite3", "socket", "redis", "picows", "uvloop", "chat.storage", "chat.adapters"}
    for path in Path(chat.core.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not any(name == f or name.startswith(f + ".") for f in forbidden), f"{path.name} imports {name}"
