"""Smoke test of the fan-out benchmark: `python -m pytest bench/fanout/test_smoke.py`.

Runs `python -m bench.fanout.run --smoke` (a 2 rooms x 5 members cell, fixed
and max rate, one run, ~10-15 s) and asserts that both servers delivered
something, each message exactly once, in order. Not a timed test: it checks
the harness and the servers' correctness, never a throughput figure.
Lives in bench/, outside the default test run (pyproject testpaths = tests).
It takes the shared benchmark lock (/tmp/roomcast-bench.lock) like any run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(2400)  # includes waiting for the shared benchmark lock
def test_smoke_run_delivers_everything_once_in_order_on_both_servers(tmp_path: Path) -> None:
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.fail("the benchmark needs a C compiler: apt-get install gcc")
    if shutil.which("taskset") is None:
        pytest.fail("the benchmark needs taskset: apt-get install util-linux")
    out = tmp_path / "smoke.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.fanout.run", "--smoke", "--out", str(out), "--log-dir", str(tmp_path / "logs")],
        cwd=REPO, capture_output=True, text=True, timeout=2300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    runs = [m for m in report["measurements"] if m["kind"] == "fanout"]
    assert {m["server"] for m in runs} == {"roomcast", "baseline"}
    assert {m["mode"] for m in runs} == {"fixed", "max"}
    for m in runs:
        where = f"{m['server']} {m['mode']}"
        assert "error" not in m, f"{where}: {m.get('error')}"
        assert m["deliveries"] > 0, where
        assert m["deliveries"] == m["expected"], f"{where}: {m['deliveries']} of {m['expected']} delivered"
        assert m["lost"] == 0, where
        assert m["undelivered"] == 0, where
        assert m["dup"] == 0, where
        assert m["out_of_order"] == 0, where
        assert m["zero_receivers"] == 0, f"{where}: PUBLISHes that reached no subscriber"
        assert m["closed_conns"] == 0, where
        assert m["error_frames"] == 0, where
