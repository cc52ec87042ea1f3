"""The stack launcher (roomcast/devstack.py): real processes, started and stopped."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest

from roomcast.devstack import ReadyLines, start_stack
from tests.support import Client


def test_ready_lines_wait_for_every_worker_once_and_pass_other_lines_on() -> None:
    kept: list[str] = []
    other: list[str] = []
    ready = ReadyLines(2, kept, other.append)
    ready("gateway worker 0 ready port=4000")
    ready("gateway worker 0 ready port=4000")  # the same worker twice is one
    ready("INFO something else")
    assert not ready.wait(0)
    ready("gateway worker 1 ready port=4000")
    assert ready.wait(0)
    assert other == ["INFO something else"]
    assert len(kept) == 4


def _children() -> set[int]:
    """The live child processes of this one (from /proc)."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
            out.add(int(entry))
    return out


async def test_a_post_reaches_members_on_both_gateways_and_stop_leaves_no_child(tmp_path: Path) -> None:
    before = _children()
    stack = await asyncio.to_thread(start_stack, tmp_path, 2, 2)
    try:
        assert set(stack.pids().values()) <= _children()
        room = "devstack-" + uuid.uuid4().hex[:8]
        sender = await Client.connect(stack.ws_url(0), "alice")
        watcher = await Client.connect(stack.ws_url(1), "bob")
        for c in (sender, watcher):
            await c.join(room)
        await sender.send({"type": "message.send", "room": room, "body": "hello", "client_msg_id": "c1"})
        assert (await sender.expect("ack", timeout=20))["client_msg_id"] == "c1"
        for c in (sender, watcher):
            [message] = await c.collect(room, 1, timeout=20)
            assert (message["body"], message["seq"], message["user"]) == ("hello", 1, "alice")
        await sender.close()
        await watcher.close()
        assert any("ready port=" in line for line in stack.logs)  # the gateways' output is captured
    finally:
        await asyncio.to_thread(stack.stop)
    assert all(p.proc.returncode is not None for p in [*stack.gateways, stack.chat, stack.kafka, stack.redis])
    assert _children() <= before


def test_the_ready_line_round_trips_and_a_partial_one_is_refused() -> None:
    from roomcast.devstack import format_ready_line, parse_ready_line

    fields = {"ws": "ws://h:1/ws", "redis": "redis://h:2", "kafka": "h:3", "history": "http://h:4/", "page": "http://h:4/"}
    line = format_ready_line(**fields)
    assert line.startswith("roomcast ready ws=") and parse_ready_line(line) == fields
    assert parse_ready_line("gateway worker 0 ready port=1") is None
    with pytest.raises(ValueError, match="lacks page"):
        parse_ready_line(line.rsplit(" ", 1)[0])
