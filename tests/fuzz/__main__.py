"""Run the fuzz targets under atheris, one process per target, one at a time.

    python -m tests.fuzz --seed 1 --runs 20000          # short, seeded: what CI runs
    python -m tests.fuzz --minutes 10 --target session  # long run, outside CI

Each target starts from its corpus in ``tests/fuzz/corpus/<target>/`` (read
only), with the dictionary ``tests/fuzz/dicts/<target>.dict`` if there is one; inputs that reach new coverage, crash inputs and the log go to
``--work-dir/<target>/`` (default ``.fuzz/``, ignored by git; a short run
empties its new-corpus directory first, so that it repeats). Prints per target the executions and the coverage reached
(libFuzzer's final ``cov:``, edges, and ``ft:``, features); exits 1 if any
target crashed or broke a property, printing the seed and the crashing
input's path. Replay a crash with ``python -m tests.fuzz.common TARGET PATH``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.fuzz.common import CORPUS_DIR, TARGETS

ROOT = Path(__file__).resolve().parents[2]
# libFuzzer dictionaries: tokens worth inserting (JSON keys, RESP headers),
# since msgspec and hiredis are C and give the fuzzer no coverage to climb.
DICTS_DIR = Path(__file__).resolve().parent / "dicts"

# libFuzzer status lines: "#20000	DONE   cov: 190 ft: 705 corp: 88/877b ... exec/s: 9000 ..."
_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)(?:.*?exec/s: (\d+))?")
_DONE = re.compile(r"^Done (\d+) runs in (\d+) second")
_CRASH_FILE = re.compile(r"Test unit written to (\S+)")


@dataclass
class Result:
    target: str
    returncode: int
    execs: int = 0
    wall_s: float = 0.0
    seconds: int = 0
    cov: int = 0
    ft: int = 0
    exec_per_s: int = 0
    crash_file: str | None = None
    log: Path | None = None

    @property
    def crashed(self) -> bool:
        return self.returncode != 0 or self.crash_file is not None


def run_target(target: str, seed: int, runs: int | None, seconds: int | None, work_dir: Path, max_len: int) -> Result:
    out_dir = work_dir / target
    new_corpus = out_dir / "corpus"
    if runs is not None:
        shutil.rmtree(new_corpus, ignore_errors=True)
    new_corpus.mkdir(parents=True, exist_ok=True)
    log = out_dir / "fuzz.log"
    budget = [f"-runs={runs}"] if runs is not None else [f"-max_total_time={seconds}"]
    command = [
        sys.executable, "-m", "tests.fuzz.common", target,
        str(new_corpus), str(CORPUS_DIR / target),  # new inputs go to the first directory
        f"-seed={seed}", *budget, f"-max_len={max_len}", "-timeout=10",
        f"-artifact_prefix={out_dir}/", "-print_final_stats=1",
    ]  # fmt: skip
    dictionary = DICTS_DIR / f"{target}.dict"
    if dictionary.is_file():
        command.append(f"-dict={dictionary}")
    # Hash randomisation would change set/dict order, and with it coverage.
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    started = time.monotonic()
    with log.open("w") as sink:
        returncode = subprocess.run(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT).returncode
    result = Result(target, returncode, wall_s=time.monotonic() - started, log=log)
    for line in log.read_text(errors="replace").splitlines():
        if match := _STATUS.match(line):
            result.execs, result.cov, result.ft = int(match[1]), int(match[2]), int(match[3])
            result.exec_per_s = int(match[4] or 0) or result.exec_per_s
        elif match := _DONE.match(line):
            result.execs, result.seconds = int(match[1]), int(match[2])
        elif match := _CRASH_FILE.search(line):
            result.crash_file = match[1]
    return result


def _report(result: Result, seed: int) -> None:
    # libFuzzer's own rate is 0 for runs under a second: then count the
    # process's whole time, start-up included.
    rate = result.execs // result.seconds if result.seconds else round(result.execs / max(result.wall_s, 0.001))
    status = "CRASH" if result.crashed else "ok"
    print(
        f"{result.target:16} {status:5} execs={result.execs} cov={result.cov} ft={result.ft} exec/s={rate} time={result.wall_s:.1f}s",
        flush=True,
    )
    if result.crashed:
        assert result.log is not None
        lines = result.log.read_text(errors="replace").splitlines()
        start = next((i for i, line in enumerate(lines) if "Uncaught Python exception" in line), max(0, len(lines) - 30))
        print("\n".join("    " + line for line in lines[start : start + 40]))
        print(f"    seed: {seed}; crashing input: {result.crash_file or '(none written)'}; log: {result.log}")
        print(f"    replay: python -m tests.fuzz.common {result.target} {result.crash_file or 'INPUT'}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--runs", type=int, help="executions per target (default 20000 unless --minutes)")
    budget.add_argument("--minutes", type=float, help="time per target, for long runs")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer seed (default 1)")
    parser.add_argument("--target", action="append", choices=TARGETS, help="only this target (repeatable)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / ".fuzz", help="new corpus entries, crashes and logs (default .fuzz/)")
    parser.add_argument("--max-len", type=int, default=4096, help="largest input libFuzzer makes (default 4096)")
    args = parser.parse_args(argv)
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: pip install -e '.[test]'", file=sys.stderr)
        return 2
    runs = None if args.minutes else (args.runs or 20000)
    seconds = max(1, round(args.minutes * 60)) if args.minutes else None
    work_dir = args.work_dir.resolve()
    print(f"fuzzing with seed {args.seed}, {f'{runs} runs' if runs else f'{seconds} s'} per target, output in {work_dir}", flush=True)
    started = time.monotonic()
    results = []
    for target in args.target or TARGETS:
        results.append(run_target(target, args.seed, runs, seconds, work_dir, args.max_len))
        _report(results[-1], args.seed)
    print(f"total: {sum(r.execs for r in results)} execs in {time.monotonic() - started:.1f} s", flush=True)
    return 1 if any(r.crashed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
