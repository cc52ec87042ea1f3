"""The `dev_stack` fixture: the whole stack as `roomcast dev` runs it.

    def test_something(dev_stack: DevStack) -> None:
        ws = websocket.create_connection(dev_stack.ws + "?user=alice")
        ...

`dev_stack` is module-scoped: one stack (Redis, Tansu, the chat service, two
gateway workers on one port) per test module, so tests in a module share it
and must use their own room ids.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from roomcast.embedded import free_port, stop_process
from tests.support import TIMEOUT_FACTOR

__all__ = ["DevStack", "dev_stack", "READY_TIMEOUT_S", "STOP_TIMEOUT_S"]

# How long `roomcast dev` may take to print its ready line, and to stop after SIGTERM.
READY_TIMEOUT_S = 90.0 * TIMEOUT_FACTOR
STOP_TIMEOUT_S = 40.0

_READY_LINE = re.compile(r"^roomcast ready (?P<pairs>.*)$")
_FIELDS = ("ws", "redis", "kafka", "history", "page")
# Test switches that are no settings of the stack: `roomcast` refuses unknown
# ROOMCAST_* variables, so they are not passed to it.
_NOT_SETTINGS = ("ROOMCAST_REQUIRE_BROWSER",)


@dataclass(frozen=True)
class DevStack:
    """A running `roomcast dev`, as announced by its ready line.

    ws: the gateway's WebSocket URL (`ws://127.0.0.1:P/ws`); redis: a
    `redis://` URL; kafka: `host:port` bootstrap; history: the chat service's
    base URL (history API and page); page: the demo page's URL; proc: the
    `roomcast dev` process (its output goes to `dev-stack.log` in its data dir).
    """

    ws: str
    redis: str
    kafka: str
    history: str
    page: str
    proc: subprocess.Popen[bytes]


def parse_ready_line(line: str) -> dict[str, str] | None:
    """The key=value pairs of a `roomcast ready ...` line, or None for any other line."""
    match = _READY_LINE.match(line.strip())
    if match is None:
        return None
    pairs = dict(pair.split("=", 1) for pair in match["pairs"].split() if "=" in pair)
    missing = [name for name in _FIELDS if name not in pairs]
    if missing:
        raise AssertionError(f"ready line lacks {', '.join(missing)}: {line!r}")
    return pairs


def _pump(proc: subprocess.Popen[bytes], log_path: Path, lines: list[str], ready: list[dict[str, str]], seen: threading.Event) -> None:
    """Read the stack's output to the end (so its pipe never fills), keeping it and looking for the ready line."""
    assert proc.stdout is not None
    # The pipe is closed at EOF: left to the garbage collector it warns in a later test.
    with proc.stdout, log_path.open("w", encoding="utf-8") as log:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append(line)
            log.write(line + "\n")
            log.flush()
            if not ready:
                try:
                    pairs = parse_ready_line(line)
                except AssertionError as exc:
                    lines.append(f"[dev_stack] {exc}")
                    pairs = None
                if pairs is not None:
                    ready.append(pairs)
                    seen.set()
    seen.set()  # end of output: the process is gone


@pytest.fixture(scope="module")
def dev_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    """`roomcast dev --port <free> --workers 2 --data-dir <tmp>`, running until the module ends.

    Fails with the stack's output if the ready line does not come within
    READY_TIMEOUT_S or the process exits first. Teardown sends SIGTERM and
    waits STOP_TIMEOUT_S before killing it.
    """
    data_dir = tmp_path_factory.mktemp("dev-stack")
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key not in _NOT_SETTINGS}
    proc = subprocess.Popen(
        [sys.executable, "-m", "roomcast.cli", "dev", "--port", str(port), "--workers", "2", "--data-dir", str(data_dir)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    lines: list[str] = []
    ready: list[dict[str, str]] = []
    seen = threading.Event()
    pump = threading.Thread(target=_pump, args=(proc, data_dir / "dev-stack.log", lines, ready, seen), daemon=True)
    pump.start()
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not seen.wait(0.1) and proc.poll() is None and time.monotonic() < deadline:
            pass
        if not ready:
            if seen.is_set():  # no ready line but the end of its output: it is exiting
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            why = (
                f"exited with {proc.poll()}" if proc.poll() is not None
                else f"printed no `roomcast ready ...` line within {READY_TIMEOUT_S:.0f} s"
            )
            stop_process(proc, STOP_TIMEOUT_S)
            pump.join(5)
            output = "\n".join(lines[-200:]) or "(no output)"
            pytest.fail(f"roomcast dev {why}; its output:\n{output}", pytrace=False)
        pairs = ready[0]
        stack = DevStack(pairs["ws"], pairs["redis"], pairs["kafka"], pairs["history"], pairs["page"], proc)
        yield stack
    finally:
        stop_process(proc, STOP_TIMEOUT_S)
        pump.join(5)
