"""bench/harness.py: the py-spy counts and the /proc readers the benchmarks report."""

from __future__ import annotations

import os
from pathlib import Path

from bench.harness import CpuMeter, ProfileCounts, busy_cores_s, cpu_split, rss_kib, taskset


def test_profile_counts_give_self_and_inclusive_shares_of_all_samples(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "proc;main;loop;write 6\n"
        "proc;main;loop;decode 3\n"
        "proc;main;idle 1\n"
        "not a sample line\n"
    )
    counts = ProfileCounts(raw)
    assert counts.total == 10
    assert counts.top(counts.own, 2) == [("write", 0.6), ("decode", 0.3)]
    assert dict(counts.top(counts.inclusive, 3, scale=100, digits=1)) == {"proc": 100.0, "main": 100.0, "loop": 90.0}


def test_an_empty_profile_has_no_top(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text("")
    counts = ProfileCounts(raw)
    assert counts.top(counts.own, 5) == []


def test_proc_readers_see_this_process_and_the_machine() -> None:
    user, system = cpu_split(os.getpid())
    assert user >= 0 and system >= 0
    busy = busy_cores_s()
    assert "cpu" in busy and "cpu0" in busy
    assert rss_kib(os.getpid())["rss_kib"] > 0
    figures = CpuMeter({"gone": 2**22 + 1}).stop()  # a pid that is no process: left out, not a crash
    assert "bench clients" in figures["cpu_cores"] and figures["others_cores"] >= 0
    assert taskset(None) == [] and taskset(1) == ["taskset", "-c", "1"]
