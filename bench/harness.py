"""What every benchmark measures with: CPU and memory from /proc, CPU pinning,
py-spy, machine facts, the file-descriptor limit and the benchmark lock.

Used by bench/hops.py and bench/fanout/run.py (pass/fail rules: bench/checks.py;
processes on free ports: roomcast/embedded.py and roomcast/devstack.py).
Linux only: it reads /proc.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import IO, Any

__all__ = [
    "CLK_TCK",
    "LOCK_PATH",
    "CpuMeter",
    "CpuSampler",
    "ProfileCounts",
    "bench_lock",
    "busy_cores_s",
    "command_first_line",
    "cpu_split",
    "machine_facts",
    "package_versions",
    "pin",
    "pin_threads",
    "py_spy_record",
    "raise_fd_limit",
    "rss_kib",
    "taskset",
    "unpin",
    "wait_py_spy",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")
# One lock for every benchmark and load run on a shared machine: runs never overlap.
LOCK_PATH = "/tmp/roomcast-bench.lock"


# ---- /proc -----------------------------------------------------------------------------


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process and its threads in seconds: user space (Python, C
    libraries) and kernel (syscalls, TCP). OSError when the process is gone."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the name, which may hold spaces
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def busy_cores_s() -> dict[str, float]:
    """Busy CPU seconds since boot of the whole machine ("cpu") and of each core
    ("cpu0", ...): everyone's, not just ours (/proc/stat; idle and iowait left out)."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *vals = line.split()
            v = [int(x) for x in vals]
            out[name] = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLK_TCK  # user nice system irq softirq steal
    return out


def rss_kib(pid: int) -> dict[str, int]:
    """Resident set now and its high-water mark (/proc/<pid>/status)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return {"rss_kib": out.get("VmRSS", 0), "hwm_kib": out.get("VmHWM", 0)}


class CpuMeter:
    """CPU used by named processes (and this one) between start and stop, in cores,
    and by everything else on the machine meanwhile.

    `others_cores` is the CPU the rest of the machine used (other engineers'
    runs on a shared box): a high figure means a noisy run.
    """

    def __init__(self, procs: dict[str, int], own_name: str = "bench clients") -> None:
        self.procs = {own_name: os.getpid(), **procs}
        self.start_cpu = {name: self._cpu_s(pid) for name, pid in self.procs.items()}
        self.start_busy = busy_cores_s()["cpu"]
        self.start = time.monotonic()

    @staticmethod
    def _cpu_s(pid: int) -> float:
        try:
            return sum(cpu_split(pid))
        except OSError:
            return float("nan")  # gone: left out of the sum below

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self.start
        used = {name: self._cpu_s(pid) - self.start_cpu[name] for name, pid in self.procs.items()}
        ours = sum(v for v in used.values() if v == v)
        machine = busy_cores_s()["cpu"] - self.start_busy
        return {
            "cpu_cores": {name: round(v / wall, 3) for name, v in used.items()},
            "others_cores": round(max(0.0, machine - ours) / wall, 3),
            "machine_busy_cores": round(machine / wall, 3),
        }


class CpuSampler:
    """Samples the CPU seconds of some processes and the busy time of each core every
    10 ms, so the CPU of an exact window (first publish -> last delivery) can be
    interpolated. Names: the process names, NAME.user, NAME.sys, and coreN."""

    def __init__(self, pids: dict[str, int], period_s: float = 0.01) -> None:
        self.pids = dict(pids)
        self.samples: list[tuple[int, dict[str, float]]] = []
        self._stop = threading.Event()
        self._period = period_s
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def add(self, name: str, pid: int) -> None:
        self.pids[name] = pid

    def _take(self) -> None:
        row = {}
        with contextlib.suppress(OSError):
            # Busy time of each core (everyone's, not just ours): shows interference.
            row.update({"core" + name[3:]: busy for name, busy in busy_cores_s().items() if name != "cpu"})
        for name, pid in list(self.pids.items()):
            with contextlib.suppress(OSError, ValueError, IndexError):
                user, system = cpu_split(pid)
                row[name] = user + system
                row[name + ".user"] = user
                row[name + ".sys"] = system
        self.samples.append((time.monotonic_ns(), row))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._take()
            self._stop.wait(self._period)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._take()

    def at(self, name: str, t_ns: int) -> float | None:
        pts = [(t, row[name]) for t, row in self.samples if name in row]
        if not pts:
            return None
        if t_ns <= pts[0][0]:
            return pts[0][1]
        for (t0, v0), (t1, v1) in zip(pts, pts[1:]):
            if t0 <= t_ns <= t1:
                return v0 + (v1 - v0) * (t_ns - t0) / max(1, t1 - t0)
        return pts[-1][1]

    def pct(self, name: str, t0_ns: int, t1_ns: int) -> float | None:
        a, b = self.at(name, t0_ns), self.at(name, t1_ns)
        if a is None or b is None or t1_ns <= t0_ns:
            return None
        return round(100 * (b - a) * 1e9 / (t1_ns - t0_ns), 1)

    def used(self, name: str, t0_ns: int, t1_ns: int) -> float | None:
        a, b = self.at(name, t0_ns), self.at(name, t1_ns)
        return None if a is None or b is None else b - a


# ---- pinning ---------------------------------------------------------------------------


def taskset(core: int | None) -> list[str]:
    """The command prefix that starts a process on one core (none for None)."""
    return ["taskset", "-c", str(core)] if core is not None else []


def pin_threads(pid: int, core: int) -> None:
    """Move a running process and all its threads to one core."""
    subprocess.run(["taskset", "-a", "-p", "-c", str(core), str(pid)], check=True, stdout=subprocess.DEVNULL)


def pin(pid: int, core: int) -> None:
    """Move a process (0: this one; its calling thread, and the threads it starts later) to one core."""
    os.sched_setaffinity(pid, {core})


def unpin() -> None:
    """This process back on every core."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))


# ---- py-spy ----------------------------------------------------------------------------


def py_spy_record(
    pid: int, out: Path, duration_s: float, rate: int, flags: Sequence[str] = (), prefix: Sequence[str] = (),
    stderr: IO[bytes] | int = subprocess.DEVNULL, py_spy: str = "py-spy",
) -> subprocess.Popen[bytes]:
    """py-spy record of pid for duration_s into out, as raw collapsed stacks."""
    argv = [*prefix, py_spy, "record", "--pid", str(pid), "--duration", str(max(1, int(duration_s))), "--rate", str(rate),
            "--format", "raw", *flags, "--output", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr)


def wait_py_spy(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class ProfileCounts:
    """Samples per function in py-spy's collapsed stacks: on top of the stack (self)
    and anywhere on it (inclusive)."""

    def __init__(self, raw: Path) -> None:
        self.own: dict[str, int] = {}
        self.inclusive: dict[str, int] = {}
        self.total = 0
        for line in raw.read_text(errors="replace").splitlines():
            stack, _, n = line.rpartition(" ")
            if not stack or not n.isdigit():
                continue
            count = int(n)
            self.total += count
            frames = [f.strip() for f in stack.split(";") if f.strip()]
            if not frames:
                continue
            self.own[frames[-1]] = self.own.get(frames[-1], 0) + count
            for f in set(frames):
                self.inclusive[f] = self.inclusive.get(f, 0) + count

    def top(self, counts: dict[str, int], n: int, scale: float = 1.0, digits: int = 3) -> list[tuple[str, float]]:
        """The n functions with the most samples, as shares of all samples times scale."""
        if not self.total:
            return []
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
        return [(fn, round(scale * c / self.total, digits)) for fn, c in ranked]


# ---- the machine -------------------------------------------------------------------------


def _proc_file_value(path: str, key: str) -> str:
    with contextlib.suppress(OSError):
        for line in open(path):
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return "?"


def command_first_line(cmd: list[str]) -> str:
    """The first line a command prints (a version), or "?"."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except Exception:
        return "?"


def package_versions(packages: Sequence[str]) -> dict[str, str]:
    def one(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"

    return {p: one(p) for p in packages}


def machine_facts() -> dict[str, Any]:
    """What a figure depends on besides the code: CPU, cores, memory, kernel, Python."""
    return {
        "cpu_model": _proc_file_value("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "mem_total": _proc_file_value("/proc/meminfo", "MemTotal"),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def raise_fd_limit(want: int | None = None) -> None:
    """Raise the soft limit of open files to want (None: the hard limit), never above the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if want is None else (want if hard == resource.RLIM_INFINITY else min(hard, want))
    if target == resource.RLIM_INFINITY or soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


# ---- the lock ------------------------------------------------------------------------------


def _lock_held_by_parent() -> bool:
    """True when an inherited fd is the lock file: we run under `flock LOCK cmd`."""
    with contextlib.suppress(OSError):
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}") == LOCK_PATH:
                    return True
    return False


@contextlib.contextmanager
def bench_lock(skip: bool = False) -> Iterator[None]:
    """Hold LOCK_PATH for the block (waits for other runs), unless skip or already held by `flock`."""
    if skip or _lock_held_by_parent():
        yield
        return
    with open(LOCK_PATH, "a") as lock_file:
        print(f"waiting for {LOCK_PATH} ...", file=sys.stderr, flush=True)
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield
