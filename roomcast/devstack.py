"""Start and stop a whole stack of processes on loopback: the one launcher.

Redis and the Tansu broker come from `roomcast.embedded`; this module adds the
topics, the chat service and the gateways as child processes, waits until
they are ready, captures their output and stops them. `roomcast dev`, the
end-to-end tests (tests/e2e/stack.py) and the benchmarks (bench/hops.py) all
start their processes through it.

`start_stack` gives each gateway process one worker on a port of its own, so a
caller knows which worker each client is on; `roomcast dev` instead runs one
gateway process with N workers sharing a port (SO_REUSEPORT).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from roomcast.embedded import ManagedProcess, free_port, start_redis, start_tansu, stop_process, wait_for_port
from roomcast.kafka import ensure_topics

__all__ = [
    "BROKERS",
    "DRAIN_WINDOW_S",
    "start_broker",
    "READY_PREFIX",
    "DevProcess",
    "DevProcessFailed",
    "format_ready_line",
    "parse_ready_line",
    "start_dev_process",
    "LOOPBACK",
    "STARTUP_TIMEOUT_S",
    "ReadyLines",
    "Stack",
    "chat_command",
    "cli_command",
    "gateway_command",
    "spawn",
    "start_chat",
    "start_gateway",
    "start_stack",
    "stop_all",
]

LOOPBACK = "127.0.0.1"
STARTUP_TIMEOUT_S = 60.0
# The drain window of the gateways `start_gateway` starts: short, so that stopping
# one (a test, a benchmark's end) stays quick. `roomcast dev` keeps the default.
DRAIN_WINDOW_S = 0.5
# Stopping a stack: gateways get their drain, then everything else.
STOP_TIMEOUT_S = 40.0

BROKERS = ("tansu", "kafka")
"""The Kafka-protocol brokers a stack can run on: Tansu (embedded, no Java) or Apache Kafka."""

READY_PREFIX = "roomcast ready "
"""`roomcast dev` prints one line starting with this once everything is up."""
READY_FIELDS = ("ws", "redis", "kafka", "history", "page")


def cli_command(*args: str) -> list[str]:
    """`roomcast ARGS` with this interpreter (works without the console script on PATH)."""
    return [sys.executable, "-m", "roomcast.cli", *args]


def start_broker(kind: str, host: str = LOOPBACK, log_path: Path | None = None) -> ManagedProcess:
    """Start the broker `kind` (BROKERS) on a free port. Raises MissingBinary naming what to install."""
    if kind == "kafka":
        from roomcast.apache_kafka import start_kafka

        return start_kafka(host, log_path=log_path, data_dir=log_path.parent / "kafka-data" if log_path else None)
    if kind != "tansu":
        raise ValueError(f"broker is {kind!r}; use one of: {', '.join(BROKERS)}")
    return start_tansu(host, log_path=log_path)


def chat_command(kafka: str, database_url: str, host: str, port: int, *extra: str) -> list[str]:
    return cli_command(
        "chat",
        "--kafka-bootstrap", kafka,
        "--database-url", database_url,
        "--http-host", host, "--http-port", str(port),
        *extra,
    )


def gateway_command(host: str, port: int, workers: int, redis_url: str, kafka: str, history_url: str, *extra: str) -> list[str]:
    return cli_command(
        "gateway",
        "--host", host, "--port", str(port), "--workers", str(workers),
        "--redis-url", redis_url, "--kafka-bootstrap", kafka, "--history-url", history_url,
        # Per-worker admin ports would collide between stacks on one machine.
        "--admin-port", "0",
        *extra,
    )


class ReadyLines:
    """Reads a process's output lines: keeps them, and is set once `expected`
    distinct gateway workers have printed their `gateway worker N ready port=P`."""

    MARKER = " ready port="

    def __init__(self, expected: int = 1, sink: list[str] | None = None, other: Callable[[str], None] | None = None) -> None:
        self.expected = expected
        self.sink = sink
        self.other = other  # lines that are not a ready line (dev prints them through)
        self.workers: set[str] = set()
        self.ready = threading.Event()

    def __call__(self, line: str) -> None:
        if self.sink is not None:
            self.sink.append(line)
        if line.startswith("gateway worker ") and self.MARKER in line:
            self.workers.add(line.split()[2])
            if len(self.workers) >= self.expected:
                self.ready.set()
        elif self.other is not None:
            self.other(line)

    def wait(self, timeout_s: float) -> bool:
        return self.ready.wait(timeout_s)


def spawn(
    name: str,
    args: Sequence[str],
    host: str,
    port: int,
    on_line: Callable[[str], None] | None = None,
    merge_stderr: bool = True,
) -> ManagedProcess:
    """Start a child process. With on_line, a thread hands it each line of the
    child's stdout (and stderr with merge_stderr); without, the output is ours."""
    if on_line is None:
        return ManagedProcess(name, subprocess.Popen(list(args), stdin=subprocess.DEVNULL), host, port)
    proc = subprocess.Popen(
        list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge_stderr else None
    )

    def pump() -> None:
        assert proc.stdout is not None
        with proc.stdout:  # closed at EOF: a killed process leaves no open pipe behind
            for raw in proc.stdout:
                on_line(raw.decode(errors="replace").rstrip())

    threading.Thread(target=pump, daemon=True, name=f"{name}-stdout").start()
    return ManagedProcess(name, proc, host, port)


def stop_all(children: Sequence[ManagedProcess], gateway_timeout_s: float = STOP_TIMEOUT_S, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stop in the order given (gateways first: they drain), each SIGTERM then SIGKILL after its bound."""
    for child in children:
        child.stop(timeout_s=gateway_timeout_s if child.name == "gateway" else timeout_s)


def start_chat(data_dir: Path, kafka: str, logs: list[str], port: int = 0, *extra: str) -> ManagedProcess:
    """The chat service on SQLite (data_dir/chat.db), its output appended to logs; returns once it listens."""
    port = port or free_port()
    args = chat_command(kafka, f"sqlite:///{data_dir / 'chat.db'}", LOOPBACK, port, *extra)
    chat = spawn("chat", args, LOOPBACK, port, logs.append)
    try:
        wait_for_port(LOOPBACK, port, STARTUP_TIMEOUT_S, chat.proc)
    except Exception:
        chat.stop()
        raise
    return chat


def start_gateway(redis_url: str, kafka: str, history_url: str, logs: list[str], port: int = 0, *extra: str) -> ManagedProcess:
    """One gateway worker on its own port (kafka or history_url may be "": not used);
    its output appended to logs; returns once it printed its ready line."""
    port = port or free_port()
    args = gateway_command(
        LOOPBACK, port, 1, redis_url, kafka, history_url,
        # A name of its own per port: the group member of a restarted worker is its predecessor's.
        "--gateway-id", f"gw-{port}", "--drain-window-s", str(DRAIN_WINDOW_S), *extra,
    )
    ready = ReadyLines(1, logs)
    gateway = spawn("gateway", args, LOOPBACK, port, ready)
    if not ready.wait(STARTUP_TIMEOUT_S):
        gateway.proc.kill()
        gateway.proc.wait()
        raise RuntimeError("gateway not ready:\n" + "\n".join(logs[-50:]))
    return gateway


@dataclass
class Stack:
    """A running stack: Redis, Tansu, the chat service and gateways one worker each."""

    redis: ManagedProcess
    kafka: ManagedProcess
    chat: ManagedProcess
    gateways: list[ManagedProcess]
    data_dir: Path
    history_url: str
    logs: list[str] = field(default_factory=list)  # chat and gateway output, in arrival order
    chat_args: Sequence[str] = ()
    gateway_args: Sequence[str] = ()

    @property
    def redis_url(self) -> str:
        return f"redis://{self.redis.address}"

    def ws_url(self, i: int) -> str:
        return f"ws://{LOOPBACK}:{self.gateways[i].port}/ws"

    def pids(self) -> dict[str, int]:
        """Each process by name (gateway0, gateway1, ..., chat, redis, broker)."""
        named = {f"gateway{i}": g.proc.pid for i, g in enumerate(self.gateways)}
        return {**named, "chat": self.chat.proc.pid, "redis": self.redis.proc.pid, "broker": self.kafka.proc.pid}

    def stop(self) -> None:
        stop_all([*self.gateways, self.chat, self.kafka, self.redis])


def start_stack(
    data_dir: Path,
    gateways: int = 2,
    partitions: int = 4,
    chat_args: Sequence[str] = (),
    gateway_args: Sequence[str] = (),
    broker: str = "tansu",
) -> Stack:
    """Redis, the broker (BROKERS) with the topics, the chat service and `gateways` gateway
    processes, on free loopback ports, files in data_dir; on a failure, what started is stopped.
    The services get the broker's kafka_profile unless the args name one."""
    logs: list[str] = []
    started: list[ManagedProcess] = []
    try:
        redis = start_redis(log_path=data_dir / "redis.log")
        started.append(redis)
        kafka = start_broker(broker, log_path=data_dir / "kafka.log")
        started.append(kafka)
        asyncio.run(ensure_topics(kafka.address, partitions))
        # argparse keeps the last of a repeated flag: the caller's own choice, after these, wins.
        chat_args = ("--kafka-profile", broker, *chat_args)
        gateway_args = ("--kafka-profile", broker, *gateway_args)
        chat = start_chat(data_dir, kafka.address, logs, 0, *chat_args)
        started.append(chat)
        history_url = f"http://{LOOPBACK}:{chat.port}/"
        gws: list[ManagedProcess] = []
        for _ in range(gateways):
            gws.append(start_gateway(f"redis://{redis.address}", kafka.address, history_url, logs, 0, *gateway_args))
            started.append(gws[-1])
    except BaseException:
        stop_all(started[::-1])
        raise
    time.sleep(0.1)  # a moment for the gateways' first subscriptions and group joins
    return Stack(redis, kafka, chat, gws, data_dir, history_url, logs, tuple(chat_args), tuple(gateway_args))


# ---- `roomcast dev` as a child process (the load test, the e2e fixture) ------------


def format_ready_line(**fields: str) -> str:
    """The `roomcast ready ws=... redis=... kafka=... history=... page=...` line."""
    return READY_PREFIX + " ".join(f"{name}={fields[name]}" for name in READY_FIELDS)


def parse_ready_line(line: str) -> dict[str, str] | None:
    """The fields of a ready line; None for any other line. Raises ValueError for a ready line lacking a field."""
    if not line.startswith(READY_PREFIX):
        return None
    fields = dict(pair.split("=", 1) for pair in line[len(READY_PREFIX):].split() if "=" in pair)
    missing = [name for name in READY_FIELDS if name not in fields]
    if missing:
        raise ValueError(f"ready line lacks {', '.join(missing)}: {line!r}")
    return fields


class DevProcessFailed(RuntimeError):
    """`roomcast dev` exited or printed no ready line in time; the message ends with its output."""


@dataclass
class DevProcess:
    """A running `roomcast dev`: its ready line's fields (ws, redis, kafka, history, page) and its output."""

    proc: subprocess.Popen[bytes]
    fields: dict[str, str]
    lines: list[str]
    _pump: threading.Thread

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (it drains), then SIGKILL after timeout_s."""
        stop_process(self.proc, timeout_s)
        self._pump.join(5)


def start_dev_process(data_dir: Path, *flags: str, timeout_s: float = 90.0, env: dict[str, str] | None = None) -> DevProcess:
    """Run `roomcast dev --data-dir data_dir *flags` and wait for its ready line.

    Its output goes to data_dir/dev-stack.log (and `lines`), read to the end
    so its pipe never fills. Raises DevProcessFailed with the output's tail.
    """
    proc = subprocess.Popen(
        cli_command("dev", "--data-dir", str(data_dir), *flags),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )
    lines: list[str] = []
    found: list[dict[str, str]] = []
    seen = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        with proc.stdout, (data_dir / "dev-stack.log").open("w", encoding="utf-8") as log:
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                lines.append(line)
                log.write(line + "\n")
                log.flush()
                if not found:
                    try:
                        fields = parse_ready_line(line)
                    except ValueError as exc:
                        lines.append(f"[devstack] {exc}")
                        fields = None
                    if fields is not None:
                        found.append(fields)
                        seen.set()
        seen.set()  # end of output: the process is gone

    reader = threading.Thread(target=pump, name="roomcast-dev-output", daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout_s
    while not seen.wait(0.1) and proc.poll() is None and time.monotonic() < deadline:
        pass
    if found:
        return DevProcess(proc, found[0], lines, reader)
    why = f"exited with {proc.poll()}" if proc.poll() is not None else f"printed no ready line within {timeout_s:.0f} s"
    stop_process(proc, STOP_TIMEOUT_S)
    reader.join(5)
    raise DevProcessFailed(f"roomcast dev {why}; its output:\n" + ("\n".join(lines[-200:]) or "(no output)"))
