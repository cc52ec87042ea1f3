"""Graceful drain on SIGTERM under load (issue: drain steps, 1012, nothing acked lost)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sqlite3
import time
from pathlib import Path

import websockets

from tests.e2e.stack import DRAIN_WINDOW_S, start_stack
from tests.support import scaled


async def test_sigterm_drains_in_order_with_1012_and_loses_no_acked_post(tmp_path: Path) -> None:
    stack = await asyncio.to_thread(start_stack, tmp_path, 1, 2)
    try:
        gateway = stack.gateways[0]
        acked: set[str] = set()
        closes: list[int] = []
        closed_at: list[float] = []

        async def client(i: int) -> None:
            async with websockets.connect(f"{stack.ws_url(0)}?user=d{i}", close_timeout=5) as ws:
                await ws.send(json.dumps({"type": "join", "room": f"drain-{i % 3}"}))
                n = 0
                try:
                    while True:
                        n += 1
                        cid = f"d{i}-{n}"
                        await ws.send(json.dumps({"type": "message.send", "room": f"drain-{i % 3}", "body": cid, "client_msg_id": cid}))
                        try:
                            while True:
                                frame = json.loads(await asyncio.wait_for(ws.recv(), 0.05))
                                if frame["type"] == "ack":
                                    acked.add(frame["client_msg_id"])
                        except asyncio.TimeoutError:
                            pass
                except websockets.ConnectionClosed as exc:
                    closed_at.append(time.monotonic())
                    closes.append(exc.rcvd.code if exc.rcvd else 1006)

        tasks = [asyncio.create_task(client(i)) for i in range(20)]
        await asyncio.sleep(3)
        assert acked, "nothing was acked before the drain"
        sent_at = time.monotonic()
        gateway.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*tasks), scaled(30))
        drained_in = time.monotonic() - sent_at
        assert (await asyncio.to_thread(gateway.proc.wait, 40)) == 0

        assert closes == [1012] * 20
        # The 1012 closes are spread over the drain window (DRAIN_WINDOW_S in the stack), not
        # bunched: no more than a quarter of them within any tenth of the window.
        tenth = DRAIN_WINDOW_S / 10
        bunched = max(sum(1 for t in closed_at if start <= t < start + tenth) for start in closed_at)
        assert bunched <= len(closed_at) // 4, f"{bunched} of {len(closed_at)} closes within {tenth * 1000:.0f} ms"
        # And the drain takes the window plus a small bound: the posts in flight, the
        # close handshakes; nothing else (it once waited 5 s on the heartbeat task).
        assert drained_in <= DRAIN_WINDOW_S + 1.5, f"the drain took {drained_in:.2f} s"
        print(f"drain: {drained_in:.2f} s, closes spread over {max(closed_at) - min(closed_at):.2f} s, at most {bunched} in {tenth * 1000:.0f} ms")
        steps = [int(m.group(1)) for line in stack.logs if (m := re.search(r"drain step (\d)/7", line))]
        assert steps == [1, 2, 3, 4, 5, 6, 7]
        assert any("drained" in line for line in stack.logs)

        # Nothing acked was lost: the chat service stores everything on message.ingest.
        deadline = time.monotonic() + scaled(20)
        while True:
            db = sqlite3.connect(stack.data_dir / "chat.db")
            try:
                stored = {row[0] for row in db.execute("select client_msg_id from messages")}
            finally:
                db.close()
            if acked <= stored or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        assert acked <= stored, f"{len(acked - stored)} acked posts were not stored"
    finally:
        await asyncio.to_thread(stack.stop)


def test_roomcast_dev_restarts_its_chat_service_and_one_ctrl_c_drains_every_worker(tmp_path: Path) -> None:
    """A chat service that exits (its watchdog gave up, or it crashed) is started again, as
    Kubernetes would. Then Ctrl-C, which signals the whole process group: dev, the gateway
    supervisor, its workers and the chat service each get it, and dev and the supervisor pass
    it on too. That one stop must drain every worker, not count as a second signal."""
    import os
    import subprocess
    import sys

    from roomcast.embedded import free_port, stop_process, wait_for_port

    proc = subprocess.Popen(
        [sys.executable, "-m", "roomcast.cli", "dev", "--port", str(free_port()), "--workers", "2", "--data-dir", str(tmp_path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    lines: list[str] = []

    def read_until(prefix: str) -> None:
        assert proc.stdout is not None
        deadline = time.monotonic() + scaled(90)
        for raw in proc.stdout:
            lines.append(raw.decode(errors="replace").rstrip())
            if prefix in lines[-1] or time.monotonic() > deadline:
                break
        assert lines and prefix in lines[-1], "\n".join(lines[-50:])

    try:
        read_until("roomcast ready ")
        history_port = int(re.search(r"history=http://127.0.0.1:(\d+)/", lines[-1]).group(1))  # type: ignore[union-attr]
        chat_pid = next(
            int(pid) for pid in os.listdir("/proc")
            if pid.isdigit() and b"\0chat\0" in Path(f"/proc/{pid}/cmdline").read_bytes()
            and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(proc.pid)
        )
        os.kill(chat_pid, signal.SIGKILL)
        read_until("the chat service exited with -9; restarting it")
        wait_for_port("127.0.0.1", history_port, scaled(30))
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        out, _ = proc.communicate(timeout=scaled(60))
        lines += out.decode(errors="replace").splitlines()
    finally:
        stop_process(proc, 10)
    text = "\n".join(lines)
    assert "without finishing the drain" not in text and "without a full drain" not in text, text[-3000:]
    assert sum(1 for line in lines if line.endswith("roomcast.gateway: drained")) == 2, text[-3000:]
    assert proc.returncode == 0, text[-3000:]
