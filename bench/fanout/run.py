"""The fan-out benchmark: one gateway worker on one core, the load on the other.

    flock /tmp/roomcast-bench.lock python -m bench.fanout.run [options]
    python -m bench.fanout.run --smoke

For every run, grid cell (R rooms x S members) and mode (a fixed publish rate
and the maximum rate), each server under test is started fresh and pinned to
core 0 (`taskset -c 0`), and measured side by side with the others:

- roomcast:  `roomcast gateway --host 127.0.0.1 --port P --redis-url URL --admin-port 0`
             (no chat service, no Kafka: the publisher PUBLISHes events itself)
- baseline:  bench/fanout/baseline_server.py (websockets + redis.asyncio,
             json.dumps and `await ws.send` per socket)
- cref:      bench/fanout/blaster.c --mode redis (C, epoll, one write() of the
             same frame per socket per message)

The load client (bench/fanout/loadclient.c, built with gcc -O2 into a cache
dir), the publisher (bench/fanout/publisher.py) and redis-server run pinned to
core 1. The client's own ceiling is measured against blaster.c --mode blast
(pre-built frames, nothing else on the path) and reported beside every figure.
An idle mode opens K joined connections and reports RSS per connection.

See bench/fanout/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import queue
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import harness
from bench.checks import over_budget
from bench.harness import (
    LOCK_PATH,
    CpuSampler,
    ProfileCounts,
    bench_lock,
    command_first_line,
    package_versions,
    pin,
    py_spy_record,
    raise_fd_limit,
    rss_kib,
    taskset,
    wait_py_spy,
)
from roomcast.embedded import free_port, stop_process

__all__ = ["main", "run_benchmark", "build_binaries"]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SERVERS = ("roomcast", "baseline", "cref")

# The targets of the issue, checked at the end (medians of the runs).
TARGET_1X1000 = 1_000_000
TARGET_100X10 = 500_000
TARGET_P50_US = 500.0
TARGET_P99_US = 2000.0
TARGET_IDLE_KIB = 10.0
TARGET_IDLE_CONNS = 50_000
TARGET_RATIO = 20.0


# ---- building ------------------------------------------------------------------------


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "roomcast-bench"


def build_binaries() -> dict[str, Path]:
    """gcc -O2 the load client and the blaster into a cache dir keyed by source hash."""
    out: dict[str, Path] = {}
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise SystemExit("bench: no C compiler: `apt-get install gcc`")
    for name in ("loadclient", "blaster"):
        src = HERE / f"{name}.c"
        digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
        target = cache_dir() / f"{name}-{digest}"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp%d" % os.getpid())
            subprocess.run([gcc, "-O2", "-Wall", "-o", str(tmp), str(src)], check=True)
            tmp.rename(target)
        out[name] = target
    return out


def snapshot_code(ref: str) -> dict[str, Any]:
    """The roomcast code the server runs: `git archive <ref>` of gateway/, roomcast/ and chat/,
    extracted once into the cache dir, so commits landing during a run do not change
    what is measured. ref "worktree" runs the live tree instead (uncommitted edits included)."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True, check=True).stdout.strip()

    if ref == "worktree":
        dirty = git("status", "--porcelain", "--", "gateway", "roomcast")
        return {"ref": "worktree", "commit": git("rev-parse", "HEAD"), "dirty": bool(dirty), "pythonpath": None}
    commit = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    target = cache_dir() / f"src-{commit[:12]}"
    if not target.exists():
        tmp = Path(tempfile.mkdtemp(prefix="src-", dir=cache_dir()))
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "gateway", "roomcast", "chat"], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        tmp.rename(target)
    subject = git("log", "-1", "--format=%s", commit)
    return {"ref": ref, "commit": commit, "subject": subject, "dirty": False, "pythonpath": str(target)}


# ---- processes -------------------------------------------------------------------------


class Proc:
    """A child process whose stdout lines are collected by a thread."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, stdin: bool = False, env: dict[str, str] | None = None,
                 cwd: Path | None = None):
        self.name = name
        self.argv = argv
        extra_env = {k: v for k, v in (env or {}).items() if os.environ.get(k) != v}
        self.command = " ".join([*(f"{k}={shlex.quote(v)}" for k, v in extra_env.items()), shlex.join(argv)])
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            cwd=str(cwd or REPO),
            env=env,
            text=True,
            bufsize=1,
        )
        self.pid = self.proc.pid
        self.lines: queue.Queue[str] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put("")  # EOF marker

    def wait_line(self, pred: Any, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no expected output after {timeout_s:.0f} s (log: {self.log_path})")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line == "" and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} (log: {self.log_path}): {self.tail()}")
            if pred(line):
                return line

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-600:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_process(self.proc, timeout_s)
        self._log.close()


# ---- machine facts ----------------------------------------------------------------------


def machine_facts(binaries: dict[str, Path]) -> dict[str, Any]:
    from roomcast.embedded import find_redis_server

    commit = command_first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = command_first_line(["git", "-C", str(REPO), "status", "--porcelain", "--", "gateway", "roomcast"])
    return {
        **harness.machine_facts(),
        "packages": package_versions(("picows", "uvloop", "websockets", "redis", "hiredis", "msgspec", "orjson")),
        "redis_server": command_first_line([find_redis_server(), "--version"]),
        "gcc": command_first_line(["gcc", "--version"]),
        "git_commit": commit,
        "gateway_tree_dirty": bool(dirty and dirty != "?"),
        "loadavg_at_start": open("/proc/loadavg").read().split()[:3],
        "rlimit_nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
    }


# ---- one measurement ------------------------------------------------------------------------


@dataclass
class Ctx:
    args: argparse.Namespace
    bins: dict[str, Path]
    redis_port: int
    redis_pid: int
    log_dir: Path
    code: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    results: list[dict[str, Any]] = field(default_factory=list)

    def uid(self) -> str:
        self.seq += 1
        return f"m{os.getpid()}x{self.seq}"


def start_server(ctx: Ctx, server: str, port: int, tag: str, extra: list[str] | None = None) -> Proc:
    a = ctx.args
    url = f"redis://127.0.0.1:{ctx.redis_port}"
    if server == "roomcast":
        exe = shutil.which("roomcast", path=str(Path(sys.executable).parent)) or "roomcast"
        argv = [*taskset(a.server_core), exe, "gateway", "--host", "127.0.0.1", "--port", str(port), "--redis-url", url,
                "--admin-port", "0", "--log-level", "warning"]
        ready = "ready port="
    elif server == "baseline":
        argv = [*taskset(a.server_core), sys.executable, "-m", "bench.fanout.baseline_server", "--port", str(port), "--redis-url", url]
        ready = "ready port="
    elif server == "cref":
        argv = [*taskset(a.server_core), str(ctx.bins["blaster"]), "--port", str(port), "--mode", "redis", "--redis-port", str(ctx.redis_port)]
        ready = "ready port="
    elif server == "sink":
        argv = [*taskset(a.server_core), str(ctx.bins["blaster"]), "--port", str(port), "--mode", "blast", *(extra or [])]
        ready = "ready port="
    else:
        raise ValueError(server)
    env = cwd = None
    if server == "roomcast" and ctx.code.get("pythonpath"):
        # The snapshot first on the path; its own directory as cwd, so the live tree is not imported.
        env = dict(os.environ, PYTHONPATH=ctx.code["pythonpath"])
        cwd = Path(ctx.code["pythonpath"])
    proc = Proc(f"{tag}-{server}", argv, ctx.log_dir, env=env, cwd=cwd)
    proc.wait_line(lambda line: ready in line, 60)
    return proc


def start_client(ctx: Ctx, port: int, conns: int, rooms: int, prefix: str, tag: str, progress: Path | None) -> tuple[Proc, dict[str, Any]]:
    argv = [*taskset(ctx.args.client_core), str(ctx.bins["loadclient"]), "--port", str(port), "--conns", str(conns), "--rooms", str(rooms),
            "--room-prefix", prefix, "--src-ips", "8", "--max-seconds", str(int(ctx.args.duration * 4 + ctx.args.drain_timeout + 300))]
    if progress is not None:
        argv += ["--progress-file", str(progress)]
    client = Proc(f"{tag}-client", argv, ctx.log_dir, stdin=True)
    line = client.wait_line(lambda l: l.startswith(("READY", "NOTREADY")), 180)
    info = json.loads(line.split(" ", 1)[1])
    if line.startswith("NOTREADY") or info.get("failed"):
        client.stop()
        raise RuntimeError(f"load client not ready: {line} (log: {client.log_path})")
    return client, info


def stop_pair(client: Proc | None, srv: Proc | None, client_timeout_s: float, server_timeout_s: float) -> None:
    """Tell the load client to quit, then stop it and the server (either may not have started)."""
    if client is not None:
        with contextlib.suppress(Exception):
            client.send("quit\n")
        client.stop(client_timeout_s)
    if srv is not None:
        srv.stop(server_timeout_s)


def measure(ctx: Ctx, server: str, rooms: int, members: int, mode: str, run: int) -> dict[str, Any]:
    """One server, one grid cell, one mode: fresh server and client, publish, drain, report."""
    a = ctx.args
    tag = ctx.uid()
    prefix = f"{tag}-"
    port = free_port()
    conns = rooms * members
    progress = Path(tempfile.gettempdir()) / f"roomcast-bench-{tag}.progress"
    result: dict[str, Any] = {"kind": "fanout", "server": server, "rooms": rooms, "members": members, "mode": mode, "run": run}
    srv = client = None
    try:
        srv = start_server(ctx, server, port, tag)
        client, ready = start_client(ctx, port, conns, rooms, prefix, tag, progress)
        result["setup_ms"] = ready.get("setup_ms")
        time.sleep(0.2)  # let the join replies and subscriptions settle
        pub_argv = [*taskset(a.client_core), sys.executable, "-m", "bench.fanout.publisher", "--redis-port", str(ctx.redis_port),
                    "--rooms", str(rooms), "--room-prefix", prefix, "--mode", mode, "--duration", str(a.duration)]
        if mode == "fixed":
            pub_argv += ["--rate", str(a.rate)]
        else:
            pub_argv += ["--members", str(members), "--progress-file", str(progress), "--window-per-conn", str(a.window_per_conn)]
        sampler = CpuSampler({"server": srv.pid, "client": client.pid, "redis": ctx.redis_pid})
        pub = spy = None
        try:
            pub = Proc(f"{tag}-publisher", pub_argv, ctx.log_dir)
            sampler.add("publisher", pub.pid)
            if a.profile and server in ("roomcast", "baseline"):
                spy = start_profile(ctx, srv.pid, f"{rooms}x{members}-{mode}-{server}-run{run}")
                result["profiled"] = True
            pub_line = pub.wait_line(lambda l: l.startswith("{"), a.duration + 120)
            pub_info = json.loads(pub_line)
            client.send(f"report {pub_info['per_room']} {int(a.drain_timeout * 1000)}\n")
            rep_line = client.wait_line(lambda l: l.startswith("{"), a.drain_timeout + 60)
            mem = rss_kib(srv.pid)
        finally:
            sampler.stop()
            if pub is not None:
                pub.stop()
            if spy is not None:
                result["profile"] = finish_profile(spy)
        rep = json.loads(rep_line)
        t_a = pub_info["t_first_pub_ns"]
        t_b = rep["t_last_recv_ns"] or pub_info["t_end_pub_ns"]
        window_s = max(1e-9, (t_b - t_a) / 1e9)
        server_cpu_s = sampler.used("server", t_a, t_b) or 0.0
        cpu = {n: sampler.pct(n, t_a, t_b) for n in ("server", "client", "publisher", "redis")}
        core_busy = {}
        for core, proc_names in ((a.server_core, ("server",)), (a.client_core, ("client", "publisher", "redis"))):
            if core is not None:
                busy = sampler.pct(f"core{core}", t_a, t_b)
                ours = sum(cpu[n] or 0 for n in proc_names)
                core_busy[f"core{core}"] = {"busy_pct": busy, "others_pct": round(max(0.0, (busy or 0) - ours), 1)}
        result.update(
            {
                "deliveries": rep["deliveries"],
                "expected": rep["expected"],
                "deliveries_per_s": round(rep["deliveries"] / window_s, 1) if rep["deliveries"] else 0.0,
                "published": pub_info["published"],
                "published_per_s": pub_info["published_per_s"],
                "zero_receivers": pub_info["zero_receivers"],
                "lost": rep["lost"],
                "undelivered": rep["undelivered"],
                "dup": rep["dup"],
                "out_of_order": rep["out_of_order"],
                "closed_conns": rep["closed_conns"],
                "error_frames": rep["error_frames"],
                "timed_out": rep["timed_out"],
                "latency_us": rep["latency_us"],
                "per_conn": rep["per_conn"],
                "measured_window_s": round(window_s, 4),
                # CPU over exactly the measured window (first publish -> last delivery).
                "server_cpu_pct": cpu["server"],
                "server_cpu_ns_per_delivery": round(1e9 * server_cpu_s / rep["deliveries"], 1) if rep["deliveries"] else None,
                # user: the server's own code (Python, C extensions); sys: the kernel (send/write,
                # and on loopback the receiver's TCP work too).
                "server_user_ns_per_delivery": round(1e9 * (sampler.used("server.user", t_a, t_b) or 0) / rep["deliveries"], 1) if rep["deliveries"] else None,
                "server_sys_ns_per_delivery": round(1e9 * (sampler.used("server.sys", t_a, t_b) or 0) / rep["deliveries"], 1) if rep["deliveries"] else None,
                "client_cpu_pct": cpu["client"],
                "publisher_cpu_pct": cpu["publisher"],
                "redis_cpu_pct": cpu["redis"],
                # Busy share of each core over the window, and the part of it not ours
                # (other engineers' processes on a shared machine, kernel threads).
                "cores": core_busy,
                "server_rss_kib": mem["rss_kib"],
                "server_hwm_kib": mem["hwm_kib"],
                "client_reads": rep["reads"],
                "window_waits": pub_info["window_waits"],
                "commands": {"server": srv.command, "client": client.command, "publisher": pub.command},
            }
        )
    except Exception as exc:  # one failed cell must not sink the run
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        stop_pair(client, srv, 5, 10)
        with contextlib.suppress(OSError):
            progress.unlink()
    return result


def start_profile(ctx: Ctx, pid: int, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    """py-spy on the server for the publishing time (it slows the server: profiled figures are flagged)."""
    a = ctx.args
    out_dir = Path(a.profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"{name}.txt"
    log = open(ctx.log_dir / f"{name}.py-spy.log", "ab")
    with log:  # the child holds its own descriptor
        spy = py_spy_record(pid, raw, a.duration, a.profile_rate, ["--native", "--idle", "--nolineno"],
                            prefix=taskset(a.client_core), stderr=log, py_spy=a.py_spy)
    return spy, raw


def finish_profile(spy: tuple[subprocess.Popen[bytes], Path]) -> dict[str, Any]:
    proc, raw = spy
    wait_py_spy(proc, 60)
    if not raw.exists():
        return {"error": "py-spy wrote nothing (see the log dir)"}
    summary = summarize_profile(raw)
    raw.with_suffix(".summary.txt").write_text(summary["text"])
    return {"raw": str(raw), "summary": str(raw.with_suffix(".summary.txt")), "top_self": summary["top_self"][:15]}


def summarize_profile(raw: Path, top: int = 40) -> dict[str, Any]:
    """Self and inclusive sample shares (%) per function from py-spy's collapsed stacks."""
    counts = ProfileCounts(raw)
    top_self = counts.top(counts.own, top, scale=100, digits=1)
    top_incl = counts.top(counts.inclusive, top, scale=100, digits=1)
    text = [f"samples: {counts.total}", "", "self (leaf frame) %:"]
    text += [f"  {p:5.1f}  {f}" for f, p in top_self]
    text += ["", "inclusive %:"]
    text += [f"  {p:5.1f}  {f}" for f, p in top_incl]
    return {"total": counts.total, "top_self": top_self, "top_incl": top_incl, "text": "\n".join(text) + "\n"}


def measure_ceiling(ctx: Ctx, rooms: int, members: int, batch: int, run: int) -> dict[str, Any]:
    """The load client against blaster.c --mode blast: how many deliveries/s the client absorbs."""
    a = ctx.args
    tag = ctx.uid()
    port = free_port()
    conns = rooms * members
    result: dict[str, Any] = {"kind": "ceiling", "rooms": rooms, "members": members, "batch": batch, "run": run}
    srv = client = None
    try:
        srv = start_server(ctx, "sink", port, tag, ["--expect-conns", str(conns), "--duration", str(a.duration), "--batch", str(batch)])
        client, _ = start_client(ctx, port, conns, rooms, f"{tag}-", tag, None)
        sampler = CpuSampler({"server": srv.pid, "client": client.pid})
        try:
            done = json.loads(srv.wait_line(lambda l: l.startswith("{"), a.duration + 120))
            client.send(f"report {done['per_room']} {int(a.drain_timeout * 1000)}\n")
            rep = json.loads(client.wait_line(lambda l: l.startswith("{"), a.drain_timeout + 60))
        finally:
            sampler.stop()
        t_a, t_b = rep["t_first_recv_ns"], rep["t_last_recv_ns"]
        span = max(1e-9, (t_b - t_a) / 1e9)
        client_pct = sampler.pct("client", t_a, t_b) or 0.0
        rate = rep["deliveries"] / span
        result.update(
            {
                "deliveries": rep["deliveries"],
                "deliveries_per_s": round(rate, 1),
                "client_cpu_pct": client_pct,
                "sink_cpu_pct": sampler.pct("server", t_a, t_b),
                # If the client was not busy all the time, the blaster was the limit:
                # the client's ceiling is at least the measured rate, scaled by its idle share.
                "client_ceiling_est_per_s": round(rate * 100 / max(client_pct, 1.0), 1),
                "lost": rep["lost"], "dup": rep["dup"], "out_of_order": rep["out_of_order"], "undelivered": rep["undelivered"],
                "client_reads": rep["reads"],
                "commands": {"server": srv.command, "client": client.command},
            }
        )
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        stop_pair(client, srv, 5, 5)
    return result


def measure_idle(ctx: Ctx, server: str, requested: int) -> dict[str, Any]:
    """K idle connections, each joined to a room (rooms of 10): RSS per connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    k = min(requested, soft - 200)
    tag = ctx.uid()
    port = free_port()
    result: dict[str, Any] = {"kind": "idle", "server": server, "requested": requested, "conns": k}
    if k < requested:
        result["clamped_by"] = f"RLIMIT_NOFILE {soft}/{hard} (setrlimit above the hard limit was refused)"
    srv = client = None
    try:
        srv = start_server(ctx, server, port, tag)
        time.sleep(1.0)
        before = rss_kib(srv.pid)
        rooms = max(1, k // 10)
        client, ready = start_client(ctx, port, k, rooms, f"{tag}-", tag, None)
        time.sleep(2.0)
        after = rss_kib(srv.pid)
        result.update(
            {
                "rooms": rooms,
                "setup_ms": ready.get("setup_ms"),
                "rss_before_kib": before["rss_kib"],
                "rss_after_kib": after["rss_kib"],
                "hwm_after_kib": after["hwm_kib"],
                "kib_per_conn": round((after["rss_kib"] - before["rss_kib"]) / k, 2),
                "commands": {"server": srv.command, "client": client.command},
            }
        )
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        stop_pair(client, srv, 10, 20)
    return result


# ---- summary --------------------------------------------------------------------------------


def _med(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    fan = [r for r in results if r["kind"] == "fanout"]
    cells: dict[tuple[int, int, str], dict[str, Any]] = {}
    for r in fan:
        cells.setdefault((r["rooms"], r["members"], r["mode"]), {}).setdefault(r["server"], []).append(r)
    ceil: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in results:
        if r["kind"] == "ceiling" and "error" not in r:
            ceil.setdefault((r["rooms"], r["members"]), []).append(r)
    rows = []
    for (rooms, members, mode), by_server in cells.items():
        meds: dict[str, float | None] = {}
        for server, rs in by_server.items():
            ok = [r for r in rs if "error" not in r]
            rates = [r["deliveries_per_s"] for r in ok]
            row = {
                "rooms": rooms, "members": members, "mode": mode, "server": server, "runs": len(rs), "failed_runs": len(rs) - len(ok),
                "errors": [r["error"] for r in rs if "error" in r],
                "profiled": any(r.get("profiled") for r in rs),
                "deliveries_per_s_median": _med(rates),
                "deliveries_per_s_min": min(rates) if rates else None,
                "deliveries_per_s_max": max(rates) if rates else None,
                "published_per_s_median": _med([r["published_per_s"] for r in ok]),
                "p50_us": _med([r["latency_us"]["p50"] for r in ok]),
                "p90_us": _med([r["latency_us"]["p90"] for r in ok]),
                "p99_us": _med([r["latency_us"]["p99"] for r in ok]),
                "p99_9_us": _med([r["latency_us"]["p99_9"] for r in ok]),
                "max_us": max([r["latency_us"]["max"] for r in ok], default=None),
                "lost": sum(r["lost"] for r in ok),
                "undelivered": sum(r["undelivered"] for r in ok),
                "dup": sum(r["dup"] for r in ok),
                "out_of_order": sum(r["out_of_order"] for r in ok),
                "closed_conns": sum(r["closed_conns"] for r in ok),
                "server_cpu_pct": _med([r["server_cpu_pct"] for r in ok]),
                "server_cpu_ns_per_delivery": _med([r["server_cpu_ns_per_delivery"] for r in ok]),
                "server_user_ns_per_delivery": _med([r.get("server_user_ns_per_delivery") for r in ok]),
                "server_sys_ns_per_delivery": _med([r.get("server_sys_ns_per_delivery") for r in ok]),
                "server_rss_kib_max": max([r["server_hwm_kib"] for r in ok], default=None),
                "client_cpu_pct": _med([r["client_cpu_pct"] for r in ok]),
                "core0_others_pct": _med([r["cores"].get("core0", {}).get("others_pct") for r in ok if r.get("cores")]),
                "core1_cpu_pct": _med([(r["client_cpu_pct"] or 0) + (r["publisher_cpu_pct"] or 0) + (r["redis_cpu_pct"] or 0) for r in ok]),
            }
            c = ceil.get((rooms, members), [])
            row["client_ceiling_batch1_per_s"] = _med([x["deliveries_per_s"] for x in c if x["batch"] == 1])
            row["client_ceiling_max_per_s"] = max([x["deliveries_per_s"] for x in c], default=None)
            meds[server] = row["deliveries_per_s_median"]
            rows.append(row)
        for row in rows:
            if (row["rooms"], row["members"], row["mode"]) != (rooms, members, mode):
                continue
            for ref in ("baseline", "cref"):
                if meds.get(ref) and row["deliveries_per_s_median"] is not None:
                    row[f"ratio_vs_{ref}"] = round(row["deliveries_per_s_median"] / meds[ref], 2)
    ceilings = []
    for (rooms, members), rs in ceil.items():
        for batch in sorted({r["batch"] for r in rs}):
            b = [r for r in rs if r["batch"] == batch]
            ceilings.append(
                {
                    "rooms": rooms, "members": members, "batch": batch,
                    "deliveries_per_s_median": _med([r["deliveries_per_s"] for r in b]),
                    "deliveries_per_s_min": min(r["deliveries_per_s"] for r in b),
                    "deliveries_per_s_max": max(r["deliveries_per_s"] for r in b),
                    "client_cpu_pct": _med([r["client_cpu_pct"] for r in b]),
                    "client_ceiling_est_per_s": _med([r["client_ceiling_est_per_s"] for r in b]),
                    "lost_dup_ooo": sum(r["lost"] + r["dup"] + r["out_of_order"] for r in b),
                }
            )
    idle = [r for r in results if r["kind"] == "idle"]
    return {"rows": rows, "ceilings": ceilings, "idle": idle}


def check_targets(summary: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = {(r["rooms"], r["members"], r["mode"], r["server"]): r for r in summary["rows"]}
    out = []

    def add(name: str, measured: Any, ok: bool | None, note: str = "") -> None:
        out.append({"target": name, "measured": measured, "met": ok, "note": note})

    def rate(cell: tuple[int, int], mode: str, server: str) -> float | None:
        r = rows.get((*cell, mode, server))
        return r["deliveries_per_s_median"] if r else None

    v = rate((1, 1000), "max", "roomcast")
    if v is not None:
        add("1x1000 max rate >= 1,000,000 deliveries/s", round(v), v >= TARGET_1X1000)
    v = rate((100, 10), "max", "roomcast")
    if v is not None:
        add("100x10 max rate >= 500,000 deliveries/s", round(v), v >= TARGET_100X10)
    v, c = rate((1000, 1), "max", "roomcast"), rate((1000, 1), "max", "cref")
    if v is not None and c:
        add("1000x1 max rate within 10% of the C one-write-per-socket server", f"{v / c:.2f} x cref", v >= 0.9 * c)
    r = rows.get((100, 10, "fixed", "roomcast"))
    if r and r["p50_us"] is not None:
        note = f"at {args.rate:g} msgs/s; publish->client, so it includes the publisher->Redis->gateway hops"
        add("100x10 fixed: p50 <= 0.5 ms", r["p50_us"], r["p50_us"] <= TARGET_P50_US, note)
        add("100x10 fixed: p99 <= 2 ms", r["p99_us"], r["p99_us"] <= TARGET_P99_US, note)
    for r in summary["idle"]:
        if r["server"] == "roomcast" and "kib_per_conn" in r:
            add(f"<= 10 KiB RSS per idle connection ({r['conns']} conns)", r["kib_per_conn"], r["kib_per_conn"] <= TARGET_IDLE_KIB,
                r.get("clamped_by", ""))
    idle_rc = [r for r in summary["idle"] if r["server"] == "roomcast" and "kib_per_conn" in r]
    if idle_rc:
        most = max(r["conns"] for r in idle_rc)
        add("50,000 connections on one worker", most, most >= TARGET_IDLE_CONNS if most >= TARGET_IDLE_CONNS else None,
            "not measurable here: " + idle_rc[-1].get("clamped_by", "") if most < TARGET_IDLE_CONNS else "")
    for (rooms, members, mode, server), r in rows.items():
        if server == "roomcast" and mode == "max" and r.get("ratio_vs_baseline") is not None:
            add(f"{rooms}x{members} max: >= 20x the naive baseline", r["ratio_vs_baseline"], r["ratio_vs_baseline"] >= TARGET_RATIO)
    bad = [r for r in summary["rows"] if r["server"] == "roomcast"]
    add("0 lost, 0 duplicated, 0 out of order (roomcast, all cells)",
        {"lost": sum(r["lost"] for r in bad), "dup": sum(r["dup"] for r in bad), "out_of_order": sum(r["out_of_order"] for r in bad),
         "undelivered": sum(r["undelivered"] for r in bad)},
        all(r["lost"] == r["dup"] == r["out_of_order"] == 0 for r in bad))
    return out


def _fmt_rate(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


def _fmt_us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v / 1000:.1f}ms" if v >= 10_000 else f"{v:.0f}us"


def render(summary: dict[str, Any], targets: list[dict[str, Any]], facts: dict[str, Any], argv: list[str]) -> str:
    lines = []
    lines.append(f"machine: {facts['cpu_model']}, {facts['cores']} cores, kernel {facts['kernel']}, Python {facts['python']}, "
                 f"{facts['redis_server'].split(' sha')[0]}, commit {facts['git_commit']}")
    lines.append("packages: " + ", ".join(f"{k} {v}" for k, v in facts["packages"].items()))
    code = facts.get("roomcast_code", {})
    lines.append(f"roomcast code: {code.get('ref')} = {str(code.get('commit'))[:10]} {code.get('subject', '')}" + (" (+ uncommitted edits)" if code.get("dirty") else ""))
    lines.append("command: " + shlex.join(argv))
    lines.append("")
    hdr = ("cell", "mode", "server", "deliv/s med", "[min-max]", "pub/s", "p50", "p99", "p99.9", "lost/undeliv/dup/ooo",
           "srv CPU", "ns/deliv usr+sys", "RSS MB", "cli CPU", "core1", "core0 other", "x base", "x cref", "client ceiling")
    table = [hdr]
    for r in sorted(summary["rows"], key=lambda r: (r["rooms"], r["members"], r["mode"], SERVERS.index(r["server"]) if r["server"] in SERVERS else 9)):
        if r["deliveries_per_s_median"] is None:
            table.append((f"{r['rooms']}x{r['members']}", r["mode"], r["server"], "FAILED", "; ".join(r["errors"])[:60], *[""] * 14))
            continue
        table.append(
            (
                f"{r['rooms']}x{r['members']}", r["mode"],
                r["server"] + (f" ({r['failed_runs']} failed)" if r["failed_runs"] else "") + (" (profiled)" if r.get("profiled") else ""),
                _fmt_rate(r["deliveries_per_s_median"]),
                f"[{_fmt_rate(r['deliveries_per_s_min'])}-{_fmt_rate(r['deliveries_per_s_max'])}]",
                _fmt_rate(r["published_per_s_median"]),
                _fmt_us(r["p50_us"]), _fmt_us(r["p99_us"]), _fmt_us(r["p99_9_us"]),
                f"{r['lost']}/{r['undelivered']}/{r['dup']}/{r['out_of_order']}",
                f"{r['server_cpu_pct']:.0f}%",
                f"{r['server_user_ns_per_delivery']:.0f}+{r['server_sys_ns_per_delivery']:.0f}" if r.get("server_user_ns_per_delivery") is not None else "-",
                f"{(r['server_rss_kib_max'] or 0) / 1024:.0f}",
                f"{r['client_cpu_pct']:.0f}%", f"{r['core1_cpu_pct']:.0f}%",
                f"{r['core0_others_pct']:.0f}%" if r.get("core0_others_pct") is not None else "-",
                f"{r['ratio_vs_baseline']:.1f}" if r.get("ratio_vs_baseline") else "-",
                f"{r['ratio_vs_cref']:.2f}" if r.get("ratio_vs_cref") else "-",
                f"{_fmt_rate(r['client_ceiling_batch1_per_s'])}/{_fmt_rate(r['client_ceiling_max_per_s'])}",
            )
        )
    widths = [max(len(str(row[i])) for row in table) for i in range(len(hdr))]
    for i, row in enumerate(table):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if summary["ceilings"]:
        lines.append("")
        lines.append("load client ceiling (client vs blaster.c --mode blast; batch = frames per write per socket):")
        for c in sorted(summary["ceilings"], key=lambda c: (c["rooms"], c["members"], c["batch"])):
            lines.append(
                f"  {c['rooms']}x{c['members']} batch {c['batch']:>3}: {_fmt_rate(c['deliveries_per_s_median'])} deliveries/s "
                f"[{_fmt_rate(c['deliveries_per_s_min'])}-{_fmt_rate(c['deliveries_per_s_max'])}], client CPU {c['client_cpu_pct']:.0f}% "
                f"-> client ceiling >= {_fmt_rate(c['client_ceiling_est_per_s'])}/s; lost+dup+ooo {c['lost_dup_ooo']}"
            )
    if summary["idle"]:
        lines.append("")
        lines.append("idle connections (each joined to a room; rooms of 10):")
        for r in summary["idle"]:
            if "error" in r:
                lines.append(f"  {r['server']} {r['requested']}: FAILED {r['error']}")
                continue
            clamp = f" (asked {r['requested']}; clamped by {r['clamped_by']})" if r.get("clamped_by") else ""
            lines.append(
                f"  {r['server']:<9} {r['conns']:>6} conns{clamp}: RSS {r['rss_before_kib'] / 1024:.0f} -> {r['rss_after_kib'] / 1024:.0f} MB, "
                f"{r['kib_per_conn']:.2f} KiB/conn"
            )
    if targets:
        lines.append("")
        lines.append("targets:")
        for t in targets:
            mark = "MET " if t["met"] else ("MISS" if t["met"] is False else "n/a ")
            lines.append(f"  [{mark}] {t['target']}: {t['measured']}" + (f"  ({t['note']})" if t["note"] else ""))
    return "\n".join(lines)


# ---- main -------------------------------------------------------------------------------------


def parse_grid(text: str) -> list[tuple[int, int]]:
    cells = []
    for part in text.split(","):
        r, s = part.lower().split("x")
        cells.append((int(r), int(s)))
    return cells


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.fanout.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="1x1000,100x10,1000x1", help="cells RxS (R rooms of S members), comma separated")
    p.add_argument("--modes", default="fixed,max", help="fixed (paced at --rate) and/or max (as fast as the window allows)")
    p.add_argument("--servers", default="roomcast,baseline,cref", help="servers to compare: roomcast, baseline, cref")
    p.add_argument("--runs", type=int, default=3, help="repetitions; figures are medians with min/max")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of publishing per measurement")
    p.add_argument("--rate", type=float, default=1000.0, help="fixed mode: messages/s in total over all rooms")
    p.add_argument("--window-per-conn", type=int, default=64, help="max mode: deliveries in flight per connection")
    p.add_argument("--drain-timeout", type=float, default=15.0, help="after publishing, wait this long for every delivery")
    p.add_argument("--ceiling-batches", default="1,16,64", help="load client ceiling: frames per blaster write; empty: skip")
    p.add_argument("--idle", default="10000,50000", help="idle-connection counts for the memory mode; empty: skip")
    p.add_argument("--idle-servers", default="roomcast,baseline", help="servers for the idle mode")
    p.add_argument("--server-core", type=int, default=0)
    p.add_argument("--client-core", type=int, default=1, help="load client, publisher and redis-server")
    p.add_argument("--out", default=str(HERE / "results" / "latest.json"), help="JSON results file")
    p.add_argument("--log-dir", help="process logs (default: a temp dir)")
    p.add_argument("--profile", metavar="DIR", help="py-spy --native each roomcast/baseline measurement into DIR (slows the server; figures flagged)")
    p.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy", help="the py-spy binary (pip install py-spy)")
    p.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    p.add_argument("--ref", default="HEAD", help="git ref of the roomcast code to run (snapshot taken once at start); 'worktree': the live tree")
    p.add_argument("--smoke", action="store_true", help="tiny and fast (~10 s): 2x5 cell, 1 run, roomcast and baseline, no ceiling/idle")
    p.add_argument("--no-lock", action="store_true", help=f"do not take {LOCK_PATH} (only when something else serializes runs)")
    return p


def run_benchmark(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    from roomcast.embedded import start_redis

    if args.smoke:
        args.grid, args.runs, args.duration, args.servers = "2x5", 1, 0.5, "roomcast,baseline"
        args.ceiling_batches, args.idle, args.drain_timeout = "", "", 10.0
    if (os.cpu_count() or 1) < 2:
        args.server_core = args.client_core = None
    bins = build_binaries()
    raise_fd_limit()
    if args.client_core is not None:
        with contextlib.suppress(OSError):
            pin(0, args.client_core)  # the runner mostly sleeps; keep it off the server's core
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="roomcast-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    facts = machine_facts(bins)
    redis = start_redis(log_path=log_dir / "redis.log")
    if args.client_core is not None:
        pin(redis.proc.pid, args.client_core)
    ctx = Ctx(args, bins, redis.port, redis.proc.pid, log_dir, code=snapshot_code(args.ref))
    facts["roomcast_code"] = ctx.code
    grid = parse_grid(args.grid)
    modes = [m for m in args.modes.split(",") if m]
    servers = [s for s in args.servers.split(",") if s]
    batches = [int(b) for b in args.ceiling_batches.split(",") if b]
    t0 = time.monotonic()

    def note(r: dict[str, Any]) -> None:
        ctx.results.append(r)
        if "error" in r:
            print(f"  ! {r['kind']} {r.get('server', 'client')} {r['rooms'] if 'rooms' in r else ''}: {r['error']}", file=sys.stderr, flush=True)
        elif r["kind"] == "fanout":
            print(f"  {r['rooms']}x{r['members']} {r['mode']:<5} {r['server']:<8} run {r['run']}: {_fmt_rate(r['deliveries_per_s'])}/s "
                  f"p50 {_fmt_us(r['latency_us']['p50'])} p99 {_fmt_us(r['latency_us']['p99'])} lost {r['lost']} undeliv {r['undelivered']} "
                  f"dup {r['dup']} ooo {r['out_of_order']} cpu {r['server_cpu_pct']}% cli {r['client_cpu_pct']}%", file=sys.stderr, flush=True)
        elif r["kind"] == "ceiling":
            print(f"  ceiling {r['rooms']}x{r['members']} batch {r['batch']} run {r['run']}: {_fmt_rate(r['deliveries_per_s'])}/s "
                  f"client cpu {r['client_cpu_pct']}%", file=sys.stderr, flush=True)
        elif r["kind"] == "idle":
            print(f"  idle {r['server']} {r['conns']}: {r.get('kib_per_conn')} KiB/conn", file=sys.stderr, flush=True)

    try:
        for run in range(1, args.runs + 1):
            print(f"run {run}/{args.runs} ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
            for rooms, members in grid:
                for batch in batches:
                    note(measure_ceiling(ctx, rooms, members, batch, run))
                for mode in modes:
                    for server in servers:
                        note(measure(ctx, server, rooms, members, mode, run))
        for k in [int(x) for x in args.idle.split(",") if x]:
            for server in [s for s in args.idle_servers.split(",") if s]:
                note(measure_idle(ctx, server, k))
    finally:
        redis.stop()
    summary = summarize(ctx.results)
    targets = check_targets(summary, args) if not args.smoke else []
    report = {
        "command": shlex.join(["python", "-m", "bench.fanout.run", *argv]),
        "machine": facts,
        "config": {k: v for k, v in vars(args).items()},
        "elapsed_s": round(time.monotonic() - t0, 1),
        "log_dir": str(log_dir),
        "summary": summary,
        "targets": targets,
        "measurements": ctx.results,
    }
    report["table"] = render(summary, targets, facts, ["python", "-m", "bench.fanout.run", *argv])
    return report


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    with bench_lock(skip=args.no_lock):
        report = run_benchmark(args, argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(report["table"])
    print(f"\nJSON: {args.out}; logs: {report['log_dir']}")
    problems = measurement_problems(report["measurements"]) + gross_breaches(report["summary"])
    if problems:
        print(f"\nFAILED: {len(problems)} measurement(s) went wrong:\n  " + "\n  ".join(problems[:20]), file=sys.stderr)
        return 1
    return 0


def gross_breaches(summary: dict[str, Any]) -> list[str]:
    """Fixed-rate roomcast cells whose median p99 is GROSS_BREACH_FACTOR times over the latency
    target: on any grid and machine that is a regression, not noise (the targets themselves are
    reported, not enforced: they need the full grid on a quiet machine)."""
    out = []
    for r in summary["rows"]:
        if r["server"] == "roomcast" and r["mode"] == "fixed" and r.get("p99_us") is not None:
            missed = over_budget(f"{r['rooms']}x{r['members']} fixed p99", r["p99_us"], TARGET_P99_US, gross=True, unit="us")
            if missed:
                out.append(missed)
    return out


def measurement_problems(measurements: list[dict[str, Any]]) -> list[str]:
    """What makes a run's figures worthless: a measurement that errored, or a fan-out cell that
    lost, doubled, reordered or left undelivered any message, delivered nothing, published to
    no subscriber, had sockets closed or error frames (a fast wrong server is no result)."""
    problems = []
    for m in measurements:
        where = f"{m.get('kind')} {m.get('rooms')}x{m.get('members')} {m.get('mode', '')} {m.get('server', '')} run {m.get('run')}".replace("  ", " ")
        if "error" in m:
            problems.append(f"{where}: {m['error']}")
            continue
        bad = {k: m[k] for k in ("lost", "dup", "out_of_order", "undelivered", "zero_receivers", "closed_conns", "error_frames", "timed_out") if m.get(k)}
        if m.get("kind") == "fanout" and m.get("deliveries") != m.get("expected"):
            bad["delivered"] = f"{m.get('deliveries')} of {m.get('expected')}"
        if m.get("kind") == "fanout" and not m.get("deliveries"):
            bad["delivered"] = "nothing"
        if bad:
            problems.append(f"{where}: " + ", ".join(f"{k} {v}" for k, v in bad.items()))
    return problems


if __name__ == "__main__":
    sys.exit(main())
