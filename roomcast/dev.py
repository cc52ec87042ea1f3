"""`roomcast dev`: the whole stack, embedded, on loopback.

Starts redis-server, the broker (--broker: Tansu, embedded, or Apache Kafka), the topics, the chat service
(SQLite in --data-dir, history API, the demo page) and the gateway with
--workers processes; prints one `roomcast ready ...` line that scripts parse;
stops everything on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
from pathlib import Path

from roomcast.config import DevConfig
from roomcast.devstack import (
    STARTUP_TIMEOUT_S,
    ReadyLines,
    chat_command,
    format_ready_line,
    gateway_command,
    spawn,
    start_broker,
    stop_all,
)
from roomcast.embedded import (
    ManagedProcess,
    MissingBinary,
    PortInUse,
    free_port,
    port_is_free,
    start_redis,
    wait_for_port,
)
from roomcast.kafka import ensure_topics

__all__ = ["run_dev"]
# The chat service is restarted when it exits, at most this often a minute.
CHAT_RESTARTS_PER_MINUTE = 5


def _say(message: str) -> None:
    print(f"roomcast dev: {message}", file=sys.stderr, flush=True)


def run_dev(config: DevConfig) -> int:
    data_dir = Path(config.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    logs = data_dir / "logs"
    logs.mkdir(exist_ok=True)
    host = config.host
    if not port_is_free(host, config.port):
        _say(f"the WebSocket port {host}:{config.port} is already in use; stop what holds it or pass --port")
        return 1

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    children: list[ManagedProcess] = []
    try:
        try:
            redis = start_redis(host, log_path=logs / "redis.log")
            children.append(redis)
            kafka = start_broker(config.broker, host, log_path=logs / "kafka.log")
            children.append(kafka)
        except (MissingBinary, PortInUse, RuntimeError, TimeoutError) as exc:
            _say(str(exc))
            return 1
        asyncio.run(ensure_topics(kafka.address, config.partitions))

        http_port = free_port(host)
        ws_url = f"ws://{host}:{config.port}/ws"
        history_url = f"http://{host}:{http_port}/"
        chat_args = chat_command(
            kafka.address, f"sqlite:///{data_dir / 'roomcast.db'}", host, http_port,
            "--page-ws-url", ws_url, "--log-level", config.log_level, "--kafka-profile", config.broker,
        )
        # The chat service's output is ours; the gateway's stdout is read for the
        # workers' ready lines, its other lines printed through.
        chat = spawn("chat", chat_args, host, http_port)
        children.append(chat)
        workers_ready = ReadyLines(config.workers, other=lambda line: print(line, flush=True))
        gateway_args = gateway_command(
            host, config.port, config.workers, f"redis://{redis.address}", kafka.address, history_url,
            "--log-level", config.log_level, "--kafka-profile", config.broker,
        )
        children.append(spawn("gateway", gateway_args, host, config.port, workers_ready, merge_stderr=False))

        try:
            wait_for_port(host, http_port, STARTUP_TIMEOUT_S, chat.proc)
            if not workers_ready.wait(STARTUP_TIMEOUT_S):
                raise TimeoutError(f"the gateway workers were not ready after {STARTUP_TIMEOUT_S:.0f} s")
        except (RuntimeError, TimeoutError) as exc:
            _say(f"start-up failed: {exc} (logs in {logs})")
            return 1

        print(
            format_ready_line(
                ws=ws_url, redis=f"redis://{redis.address}", kafka=kafka.address,
                history=history_url, page=f"http://{host}:{http_port}/",
            ),
            flush=True,
        )
        chat_restarts: list[float] = []
        while not stop.is_set():
            for i, child in enumerate(children):
                if child.alive():
                    continue
                recent = [t for t in chat_restarts if time.monotonic() - t < 60]
                if child.name == "chat" and len(recent) < CHAT_RESTARTS_PER_MINUTE:
                    # As Kubernetes would: the chat service exits non-zero when its
                    # consumer's watchdog gives up (README, "Liveness").
                    _say(f"the chat service exited with {child.proc.returncode}; restarting it")
                    chat_restarts = [*recent, time.monotonic()]
                    children[i] = spawn("chat", chat_args, host, http_port)
                    continue
                _say(f"{child.name} exited with {child.proc.returncode}; stopping the stack")
                return 1
            stop.wait(0.5)
        _say("stopping")
        return 0
    finally:
        # Gateways first (they drain), then the chat service, then the infrastructure.
        stop_all(children[::-1], gateway_timeout_s=35.0, timeout_s=10.0)
