"""Benchmark two git revisions side by side, interleaved, on this machine.

    python -m bench.compare HEAD~1 HEAD
    python -m bench.compare main my-branch --threshold 0.10 --rounds 5
    python -m bench.compare HEAD~1 HEAD -k "envelope or decode" --hops
    flock /tmp/roomcast-bench.lock python -m bench.compare HEAD~1 HEAD   # on a shared box

Why: a stored baseline from another machine (or from this one at another
load) proves nothing on a shared 2-core box. Both revisions run here, now,
alternating A, B, A, B ..., so slow phases of the machine hit both alike.

How:
1. Each revision is checked out with `git worktree add --detach` into a
   temporary directory (removed at the end, also on failure or Ctrl-C).
2. The benchmark *harness* is the current working tree's bench/test_micro.py
   (and with --hops bench/hops.py, harness.py and checks.py), copied next to
   the worktrees: the measuring code stays the same, only the measured code
   changes. Each run imports `roomcast`, `gateway` and `chat` from its
   worktree (PYTHONPATH and cwd; checked before the first round) with this
   virtualenv's packages; nothing is installed. A benchmark missing in
   either revision is skipped.
3. Each round runs the micro benchmarks once per revision
   (`--benchmark-only --benchmark-json`) and keeps each benchmark's median.
4. Per benchmark, B's figure over A's is the ratio; a ratio above
   1 + threshold fails the comparison (exit 1). A revision's figure is, by
   default (`--stat best`), the best of its rounds, each round giving
   pytest-benchmark's minimum: on a shared machine noise only ever adds time,
   and whole rounds run at half speed while another process holds the other
   CPU. An A/A run (the same code twice) on the 2-core box flagged 31 of 38
   benchmarks 1.1-2x "worse" with the median of the round medians.
   `--stat median` takes the median of the round medians, as pytest-benchmark
   reports it (for quiet machines). The table also shows A's spread between
   rounds (the noise floor) and in how many rounds B was slower.

With --hops, each round also runs `bench.hops --smoke` (Redis hop by default)
per revision and compares p50 and p99 with --hops-threshold (latency on a
noisy box moves more than CPU time).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


class Revision:
    def __init__(self, label: str, rev: str, root: Path) -> None:
        self.label = label
        self.rev = rev
        self.sha = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
        self.path = root / f"{label}-{self.sha[:10]}"
        self.micro: dict[str, list[float]] = {}
        self.hops: dict[str, list[float]] = {}

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(self.path) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env

    def add_worktree(self) -> None:
        _git("worktree", "add", "--detach", "--quiet", str(self.path), self.sha)

    def remove_worktree(self) -> None:
        if self.path.exists():
            subprocess.run(["git", "worktree", "remove", "--force", str(self.path)], cwd=REPO, capture_output=True)
        shutil.rmtree(self.path, ignore_errors=True)

    def check_imports(self) -> None:
        """The packages must come from the worktree, not from the editable install of the main tree."""
        code = "import roomcast, gateway, chat; print(roomcast.__file__); print(gateway.__file__); print(chat.__file__)"
        out = subprocess.run([sys.executable, "-c", code], cwd=self.path, env=self.env(), capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"bench.compare: {self.rev} does not import: {out.stderr.strip()[-500:]}")
        for line in out.stdout.split():
            if not Path(line).resolve().is_relative_to(self.path.resolve()):
                raise SystemExit(f"bench.compare: {self.rev} imported {line}, outside its worktree {self.path}")


def _run_micro(rev: Revision, harness: Path, out: Path, args: argparse.Namespace) -> None:
    cmd = [
        sys.executable, "-m", "pytest", str(harness / "test_micro.py"),
        "-c", str(harness / "pytest.ini"), "--rootdir", str(harness),
        "-p", "no:cacheprovider", "-q", "--benchmark-only",
        f"--benchmark-json={out}",
        f"--benchmark-max-time={args.max_time}",
        "--benchmark-min-rounds=5",
    ]
    if args.k:
        cmd += ["-k", args.k]
    proc = subprocess.run(cmd, cwd=rev.path, env=rev.env(), capture_output=True, text=True)
    if proc.returncode not in (0, 5) or not out.exists():
        raise SystemExit(f"bench.compare: micro benchmarks failed for {rev.rev}:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    key = "min" if args.stat == "best" else "median"
    for bench in json.loads(out.read_text())["benchmarks"]:
        rev.micro.setdefault(bench["name"], []).append(bench["stats"][key])


def _run_hops(rev: Revision, harness: Path, out: Path, args: argparse.Namespace) -> None:
    cmd = [sys.executable, "-m", "bench.hops", "--smoke", "--hops", args.hops_which, "--out", str(out)]
    env = rev.env()
    env["PYTHONPATH"] = str(harness) + os.pathsep + env["PYTHONPATH"]  # the harness's bench package, the revision's roomcast
    # cwd: the harness, as `-m` puts the cwd first on the path.
    proc = subprocess.run(cmd, cwd=harness, env=env, capture_output=True, text=True)
    if not out.exists():
        raise SystemExit(f"bench.compare: bench.hops failed for {rev.rev}:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}")
    for row in json.loads(out.read_text())["results"]:
        for key in ("p50_ms", "p99_ms"):
            rev.hops.setdefault(f"hops: {row['hop']} {key[:3]}", []).append(row[key] / 1000)  # seconds, like the micro ones
        if not row["lossless"]:
            rev.hops.setdefault(f"hops: {row['hop']} LOST", []).append(float(row["lost"]))


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-6:
        return f"{seconds * 1e9:.1f} ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} us"
    return f"{seconds * 1e3:.3f} ms"


def _compare(
    a: dict[str, list[float]], b: dict[str, list[float]], threshold: float, stat: str = "best"
) -> tuple[list[list[str]], list[str]]:
    pick = min if stat == "best" else statistics.median
    rows: list[list[str]] = []
    worse: list[str] = []
    for name in sorted(set(a) & set(b)):
        ma, mb = pick(a[name]), pick(b[name])
        ratio = mb / ma if ma else float("inf")
        spread = (max(a[name]) - min(a[name])) / ma if ma else 0.0
        slower_rounds = sum(1 for x, y in zip(a[name], b[name]) if y > x)
        regressed = ratio > 1 + threshold
        if regressed:
            worse.append(name)
        verdict = "WORSE" if regressed else ("better" if ratio < 1 - threshold else "same")
        rows.append([name, _fmt_time(ma), _fmt_time(mb), f"{ratio:.3f}", f"{spread * 100:.0f}%", f"{slower_rounds}/{min(len(a[name]), len(b[name]))}", verdict])
    return rows, worse


def _print_table(title: str, rows: list[list[str]], stat: str = "best") -> None:
    label = "best" if stat == "best" else "median"
    head = ["benchmark", f"A {label}", f"B {label}", "B/A", "A spread", "B slower", "verdict"]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    print(f"\n{title}")
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.compare",
        description="Benchmark two git revisions interleaved on this machine; exit 1 if a median got worse than the threshold.",
    )
    p.add_argument("rev_a", metavar="REV_A", help="baseline revision (e.g. HEAD~1, main)")
    p.add_argument("rev_b", metavar="REV_B", help="candidate revision (e.g. HEAD)")
    p.add_argument("--threshold", type=float, default=0.10, help="fail when B's median is over (1 + this) x A's (default 0.10)")
    p.add_argument("--rounds", type=int, default=5, help="rounds; each runs A then B (default 5)")
    p.add_argument("-k", default="not socket_write",
                   help="pytest -k expression selecting micro benchmarks (default: all but the socket writes, which time the "
                        "kernel and another process rather than roomcast code and swing 2x with the load)")
    p.add_argument("--stat", choices=("best", "median"), default="best",
                   help="per revision: the best round (pytest-benchmark min; default, robust on a shared machine) or the median of the round medians")
    p.add_argument("--max-time", type=float, default=0.2, help="pytest-benchmark --benchmark-max-time per benchmark per round (default 0.2 s)")
    p.add_argument("--hops", action="store_true", help="also run `bench.hops --smoke` per revision each round")
    p.add_argument("--hops-which", default="redis", help="hops for --hops (default redis; e.g. redis,kafka)")
    p.add_argument("--hops-threshold", type=float, default=0.30, help="threshold for hop p50/p99 (default 0.30)")
    p.add_argument("--out", default="reports/compare.json", help="JSON with every round's medians (default reports/compare.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    revs: list[Revision] = []
    try:
        a = Revision("a", args.rev_a, tmp)
        b = Revision("b", args.rev_b, tmp)
        revs = [a, b]
        harness = tmp / "harness"
        harness.mkdir()
        for name in ("test_micro.py", "conftest.py"):
            shutil.copy2(HERE / name, harness / name)
        # bench.hops with the modules it imports from bench/ (it starts its processes
        # with the revision's roomcast.devstack: revisions from before it have none).
        (harness / "bench").mkdir()
        for name in ("__init__.py", "checks.py", "harness.py", "hops.py"):
            shutil.copy2(HERE / name, harness / "bench" / name)
        (harness / "pytest.ini").write_text("[pytest]\n")  # not the revision's config: same for both
        for rev in revs:
            rev.add_worktree()
            rev.check_imports()
        print(f"A = {a.rev} ({a.sha[:10]}), B = {b.rev} ({b.sha[:10]}); harness from the working tree; "
              f"{args.rounds} rounds, threshold {args.threshold:.0%}")
        for r in range(args.rounds):
            for rev in revs:  # A, B, A, B, ...
                t0 = time.monotonic()
                _run_micro(rev, harness, tmp / f"micro-{rev.label}-{r}.json", args)
                if args.hops:
                    _run_hops(rev, harness, tmp / f"hops-{rev.label}-{r}.json", args)
                print(f"  round {r + 1}/{args.rounds} {rev.label} ({rev.rev}): {time.monotonic() - t0:.0f} s", flush=True)
        how = "best of" if args.stat == "best" else "median of"
        rows, worse = _compare(a.micro, b.micro, args.threshold, args.stat)
        _print_table(f"micro benchmarks ({how} {args.rounds} rounds: pytest-benchmark {'min' if args.stat == 'best' else 'median'} per round)", rows, args.stat)
        if args.hops:
            hop_rows, hop_worse = _compare(a.hops, b.hops, args.hops_threshold, args.stat)
            _print_table(f"hops --smoke ({args.hops_which}, {how} {args.rounds} rounds), threshold {args.hops_threshold:.0%}", hop_rows, args.stat)
            worse += hop_worse
            lost = [n for rev in revs for n in rev.hops if n.endswith("LOST")]
            worse += [f"{n} (in {rev.rev})" for rev in revs for n in rev.hops if n.endswith("LOST")] if lost else []
        only = sorted(set(a.micro) ^ set(b.micro))
        if only:
            print(f"\nin one revision only (not compared): {', '.join(only)}")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "a": {"rev": a.rev, "sha": a.sha, "micro": a.micro, "hops": a.hops},
            "b": {"rev": b.rev, "sha": b.sha, "micro": b.micro, "hops": b.hops},
            "threshold": args.threshold, "rounds": args.rounds, "stat": args.stat, "worse": worse,
            "loadavg_at_end": os.getloadavg(),
        }, indent=2))
        print(f"\n{time.monotonic() - started:.0f} s; rounds in {out}")
        if worse:
            print(f"FAILED: worse than the threshold in B ({b.rev}): {', '.join(worse)}", file=sys.stderr)
            return 1
        print(f"ok: no benchmark of {b.rev} is worse than {a.rev} by more than the threshold")
        return 0
    finally:
        for rev in revs:
            rev.remove_worktree()
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
