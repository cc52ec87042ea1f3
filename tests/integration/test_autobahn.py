"""Autobahn conformance of the WebSocket layer, driven by kosoku.

The real gateway runs with its ``/echo`` test route (``test_echo_route``:
``EchoListener``, the same frame layer and limits as ``/ws``) on a free port
in a thread, under plain asyncio and under uvloop; ``kosoku`` runs Autobahn's
case files against it as a subprocess. Every case of sections 1-7
and 10 must pass (OK, NON-STRICT or INFORMATIONAL, as Autobahn grades);
sections 9 (performance), 12 and 13 (compression) are not run.

A few raw-socket tests follow, each pinned on a case whose outcome under
kosoku depends on how TCP happens to batch the frames: they put the frames
in one write, so the server sees them in one read every time.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import uvloop

from gateway.adapters.message_listener import DEFAULT_MAX_MESSAGE_BYTES
from gateway.worker import GatewayWorker
from roomcast.config import GatewayConfig
from tests.support import scaled

# Autobahn sections run: 1 framing, 2 pings/pongs, 3 reserved bits,
# 4 opcodes, 5 fragmentation, 6 UTF-8, 7 close handshake, 10 misc.
SECTIONS = ("1", "2", "3", "4", "5", "6", "7", "10")
# kosoku 0.1 has 247 cases in these sections; fewer means the selection broke.
MIN_CASES = 247
PASSING_BEHAVIORS = {"OK", "NON-STRICT", "INFORMATIONAL"}
PASSING_CLOSE_BEHAVIORS = {"OK", "INFORMATIONAL"}
INSTALL_HINT = "kosoku is not installed in this environment: pip install kosoku (or pip install -e '.[test]')"


# -- the server under test ------------------------------------------------------


class GatewayThread:
    """The real gateway (`GatewayWorker` with its /echo test route) on 127.0.0.1:<free
    port>, with its own event loop in a thread, so the test can block on kosoku.
    /echo runs through the same frame layer and limits as /ws."""

    def __init__(self, loop_kind: str, redis_url: str) -> None:
        self._run = uvloop.run if loop_kind == "uvloop" else asyncio.run
        self._redis_url = redis_url
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._main, name=f"gateway-{loop_kind}", daemon=True)

    def __enter__(self) -> GatewayThread:
        self._thread.start()
        if not self._ready.wait(scaled(10)):
            raise RuntimeError("gateway did not start within 10 s")
        if self._error is not None:
            raise RuntimeError("gateway failed to start") from self._error
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(scaled(20))
        assert not self._thread.is_alive(), "gateway thread did not stop"
        if self._error is not None:
            raise RuntimeError("gateway failed") from self._error

    def _main(self) -> None:
        try:
            self._run(self._serve())
        except BaseException as exc:  # reported by __enter__/__exit__ on the test thread
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = self._loop.create_future()
        config = GatewayConfig(
            host="127.0.0.1", port=0, admin_port=0, redis_url=self._redis_url,
            max_frame_bytes=DEFAULT_MAX_MESSAGE_BYTES, test_echo_route=True,
        )
        app = GatewayWorker(config)
        await app.start()
        self.port = app.port
        self._ready.set()
        try:
            await self._stop
        finally:
            await app.drain()


@pytest.fixture(params=["asyncio", "uvloop"])
def echo_url(request: pytest.FixtureRequest, redis_url: str) -> Iterator[str]:
    """ws:// URL of the real gateway's /echo route (enabled by its test flag)."""
    with GatewayThread(request.param, redis_url) as server:
        yield f"ws://127.0.0.1:{server.port}/echo"


def test_echo_route_exists_only_behind_the_test_flag(redis_url: str) -> None:
    async def main() -> int:
        app = GatewayWorker(GatewayConfig(host="127.0.0.1", port=0, admin_port=0, redis_url=redis_url))
        await app.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
            writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            status = int((await reader.readline()).split()[1])
            writer.close()
            return status
        finally:
            await app.drain()

    assert asyncio.run(main()) == 404


# -- Autobahn via kosoku -----------------------------------------------------------


def kosoku_executable() -> str:
    # The console script next to this interpreter first: the venv's kosoku.
    beside = Path(sys.executable).with_name("kosoku")
    found = str(beside) if beside.exists() else shutil.which("kosoku")
    if found is None or importlib.util.find_spec("kosoku") is None:
        pytest.fail(INSTALL_HINT)
    return found


def load_results(outdir: Path) -> dict[str, dict[str, Any]]:
    index = json.loads((outdir / "index.json").read_text())
    assert len(index) == 1, f"expected one agent in {outdir / 'index.json'}, got {list(index)}"
    results: dict[str, dict[str, Any]] = next(iter(index.values()))
    return results


def describe_failure(outdir: Path, case_id: str, summary: dict[str, Any]) -> str:
    lines = [f"--- case {case_id}: {json.dumps(summary)}"]
    report = outdir / summary.get("reportfile", "")
    if report.is_file():
        full = json.loads(report.read_text())
        for key in ("description", "expectation", "result", "resultClose", "expected", "received", "expectedClose"):
            lines.append(f"  {key}: {json.dumps(full.get(key), default=str)[:500]}")
        lines.append("  wirelog (last 12):")
        lines += [f"    {json.dumps(entry, default=str)[:200]}" for entry in (full.get("wirelog") or [])[-12:]]
    return "\n".join(lines)


def case_section(case_id: str) -> str:
    return case_id.split(".", 1)[0]


def test_autobahn_sections_1_to_7_and_10_all_pass(echo_url: str, tmp_path: Path) -> None:
    outdir = tmp_path / "reports"
    command = [kosoku_executable(), echo_url, "-o", str(outdir)]
    for section in SECTIONS:
        command += ["-i", f"{section}.*"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=scaled(150))

    assert (outdir / "index.json").is_file(), f"kosoku wrote no report (exit {run.returncode}):\n{run.stdout}\n{run.stderr}"
    results = load_results(outdir)
    failing = {
        case_id: summary
        for case_id, summary in results.items()
        if summary.get("behavior") not in PASSING_BEHAVIORS
        or summary.get("behaviorClose") not in PASSING_CLOSE_BEHAVIORS
    }
    if failing or run.returncode != 0:
        details = "\n".join(describe_failure(outdir, case_id, failing[case_id]) for case_id in sorted(failing))
        pytest.fail(
            f"kosoku exit {run.returncode}; failing cases: {sorted(failing)}\n{details}\n"
            f"stdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-3000:]}"
        )

    # A selection that ran nothing, or the wrong sections, is not a pass.
    sections_run = {case_section(case_id) for case_id in results}
    assert sections_run == set(SECTIONS), f"sections run: {sorted(sections_run)}"
    assert len(results) >= MIN_CASES, f"only {len(results)} cases ran; kosoku's selection changed?"


# -- deterministic same-read cases ---------------------------------------------------


def client_frame(opcode: int, payload: bytes = b"", *, fin: bool = True) -> bytes:
    """A masked client frame (RFC 6455 5.2)."""
    length = len(payload)
    if length < 126:
        header = bytes([(0x80 if fin else 0) | opcode, 0x80 | length])
    elif length < 65536:
        header = bytes([(0x80 if fin else 0) | opcode, 0x80 | 126]) + length.to_bytes(2, "big")
    else:
        header = bytes([(0x80 if fin else 0) | opcode, 0x80 | 127]) + length.to_bytes(8, "big")
    mask = os.urandom(4)
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@contextlib.contextmanager
def raw_connection(url: str) -> Iterator[socket.socket]:
    """A TCP socket after a completed WebSocket upgrade to ``url``."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    with socket.create_connection((host, port), timeout=scaled(5)) as sock:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = sock.recv(4096)
            assert chunk, f"connection closed during the upgrade: {response!r}"
            response += chunk
        assert response.startswith(b"HTTP/1.1 101"), response
        # A server sends no frame before the client's first one here.
        assert response.endswith(b"\r\n\r\n"), response
        yield sock


def read_frames_until_close(sock: socket.socket) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each server frame, through the close frame or EOF."""
    data = b""
    frames: list[tuple[int, bytes]] = []
    while True:
        while len(data) >= 2:
            length = data[1] & 0x7F
            offset = 2
            if length == 126:
                length, offset = int.from_bytes(data[2:4], "big"), 4
            elif length == 127:
                length, offset = int.from_bytes(data[2:10], "big"), 10
            if len(data) < offset + length:
                break
            frames.append((data[0] & 0x0F, data[offset : offset + length]))
            data = data[offset + length :]
            if frames[-1][0] == 0x8:
                return frames
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return frames
        if not chunk:
            return frames
        data += chunk


def close_code(frame: tuple[int, bytes]) -> int:
    assert frame[0] == 0x8, f"not a close frame: {frame}"
    return int.from_bytes(frame[1][:2], "big")


def test_message_before_a_reserved_opcode_in_the_same_read_is_echoed_before_the_1002(echo_url: str) -> None:
    # Autobahn 4.1.3. picows parses the reserved opcode before it delivers
    # the text frame; the read splitter delivers the text first.
    with raw_connection(echo_url) as sock:
        sock.sendall(client_frame(0x1, b"Hello, world!") + client_frame(0x5) + client_frame(0x9))
        frames = read_frames_until_close(sock)
    assert frames[0] == (0x1, b"Hello, world!"), frames
    assert close_code(frames[1]) == 1002 and len(frames) == 2, frames


def test_second_close_in_the_same_read_does_not_replace_the_echoed_close(echo_url: str) -> None:
    # Autobahn 7.1.2. Unsplit, picows answers the second close with its own
    # 1002 before the first reaches the listener.
    with raw_connection(echo_url) as sock:
        sock.sendall(client_frame(0x8, (1000).to_bytes(2, "big")) + client_frame(0x8))
        frames = read_frames_until_close(sock)
    assert len(frames) == 1 and close_code(frames[0]) == 1000, frames


def test_ping_with_a_reserved_bit_fails_with_1002_instead_of_a_pong(echo_url: str) -> None:
    # Autobahn 3.6; needs picows' automatic pong off (make_server_kwargs).
    with raw_connection(echo_url) as sock:
        sock.sendall(bytes([0x80 | 0x40 | 0x9]) + client_frame(0x9, b"ping")[1:])
        frames = read_frames_until_close(sock)
    assert len(frames) == 1 and close_code(frames[0]) == 1002, frames


def test_text_frame_just_over_the_limit_is_closed_1009_by_the_layer(echo_url: str) -> None:
    # make_server_kwargs sets picows' max_frame_size above the layer's limit,
    # so the layer's reason ("message over ...") is the one sent.
    with raw_connection(echo_url) as sock:
        sock.sendall(client_frame(0x1, b"x" * (DEFAULT_MAX_MESSAGE_BYTES + 1)))
        frames = read_frames_until_close(sock)
    assert len(frames) == 1 and close_code(frames[0]) == 1009, frames
    assert frames[0][1][2:].startswith(b"message over"), frames


def test_fragmented_text_over_the_limit_is_closed_1009(echo_url: str) -> None:
    half = DEFAULT_MAX_MESSAGE_BYTES // 2 + 1
    with raw_connection(echo_url) as sock:
        sock.sendall(client_frame(0x1, b"x" * half, fin=False) + client_frame(0x0, b"x" * half))
        frames = read_frames_until_close(sock)
    assert len(frames) == 1 and close_code(frames[0]) == 1009, frames
