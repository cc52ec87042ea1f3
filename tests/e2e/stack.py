"""A real stack of processes for end-to-end tests: Redis, Tansu, chat, gateways.

Unlike `roomcast dev` (one port, SO_REUSEPORT), each gateway worker here gets
its own port, so a test knows which worker each client is on.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from roomcast.embedded import ManagedProcess, free_port, start_redis, start_tansu, wait_for_port
from roomcast.kafka import ensure_topics

# The gateways' drain window: short, so tests that stop a gateway stay quick.
DRAIN_WINDOW_S = 0.5


@dataclass
class Stack:
    redis: ManagedProcess
    kafka: ManagedProcess
    chat: ManagedProcess
    gateways: list[ManagedProcess]
    data_dir: Path
    history_url: str
    logs: list[str] = field(default_factory=list)
    chat_args: Sequence[str] = ()
    gateway_args: Sequence[str] = ()

    @property
    def redis_url(self) -> str:
        return f"redis://{self.redis.address}"

    def ws_url(self, i: int) -> str:
        return f"ws://127.0.0.1:{self.gateways[i].port}/ws"

    def stop(self) -> None:
        for proc in [*self.gateways, self.chat, self.kafka, self.redis]:
            proc.stop(timeout_s=40)


def _pump(proc: subprocess.Popen[bytes], sink: list[str], ready: threading.Event, marker: str) -> None:
    assert proc.stdout is not None
    with proc.stdout:  # closed at EOF: a killed process leaves no open pipe behind
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            sink.append(line)
            if marker in line:
                ready.set()


def start_chat(data_dir: Path, kafka: str, logs: list[str], port: int = 0, *extra: str) -> ManagedProcess:
    port = port or free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "roomcast.cli", "chat",
            "--kafka-bootstrap", kafka,
            "--database-url", f"sqlite:///{data_dir / 'chat.db'}",
            "--http-host", "127.0.0.1", "--http-port", str(port), *extra,
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    threading.Thread(target=_pump, args=(proc, logs, threading.Event(), "\0"), daemon=True).start()
    wait_for_port("127.0.0.1", port, 60, proc)
    return ManagedProcess("chat", proc, "127.0.0.1", port)


def start_gateway(redis_url: str, kafka: str, history_url: str, logs: list[str], port: int = 0, *extra: str) -> ManagedProcess:
    port = port or free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "roomcast.cli", "gateway",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--redis-url", redis_url, "--kafka-bootstrap", kafka, "--history-url", history_url,
            # A name of its own per port: the group member of a restarted worker is its predecessor's.
            "--gateway-id", f"gw-{port}", "--drain-window-s", str(DRAIN_WINDOW_S), "--admin-port", "0", *extra,
        ],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    ready = threading.Event()
    threading.Thread(target=_pump, args=(proc, logs, ready, "ready port="), daemon=True).start()
    if not ready.wait(60):
        proc.kill()
        raise RuntimeError("gateway not ready:\n" + "\n".join(logs[-50:]))
    return ManagedProcess("gateway", proc, "127.0.0.1", port)


def start_stack(
    data_dir: Path, gateways: int = 2, partitions: int = 4, chat_args: Sequence[str] = (), gateway_args: Sequence[str] = ()
) -> Stack:
    logs: list[str] = []
    redis = start_redis(log_path=data_dir / "redis.log")
    kafka = start_tansu(log_path=data_dir / "kafka.log")
    asyncio.run(ensure_topics(kafka.address, partitions))
    chat = start_chat(data_dir, kafka.address, logs, 0, *chat_args)
    history_url = f"http://127.0.0.1:{chat.port}/"
    gws = [start_gateway(f"redis://{redis.address}", kafka.address, history_url, logs, 0, *gateway_args) for _ in range(gateways)]
    time.sleep(0.1)
    return Stack(redis, kafka, chat, gws, data_dir, history_url, logs, tuple(chat_args), tuple(gateway_args))
