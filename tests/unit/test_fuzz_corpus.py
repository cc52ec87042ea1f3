"""The fuzz targets (tests/fuzz/) in the normal suite.

Every corpus file is replayed through its target's property check, without
atheris (fast); then the short seeded atheris run of all targets runs as a
subprocess, as ``python -m tests.fuzz --seed 1 --runs 20000`` would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz.common import CORPUS_DIR, TARGETS, load_check

ROOT = Path(__file__).resolve().parents[2]
# The corpus lives in the repository: keep it small.
MAX_CORPUS_BYTES = 200 * 1024

CORPUS = sorted((target, path) for target in TARGETS for path in (CORPUS_DIR / target).iterdir())


def test_every_target_has_a_corpus_and_it_stays_small():
    for target in TARGETS:
        assert any((CORPUS_DIR / target).iterdir()), f"tests/fuzz/corpus/{target}/ is empty"
    assert {p.name for p in CORPUS_DIR.iterdir()} == set(TARGETS), "a corpus directory with no target"
    total = sum(path.stat().st_size for _, path in CORPUS)
    assert total <= MAX_CORPUS_BYTES, f"fuzz corpus is {total} bytes; keep it under {MAX_CORPUS_BYTES}"


@pytest.mark.parametrize(("target", "path"), CORPUS, ids=[f"{t}/{p.name}" for t, p in CORPUS])
def test_corpus_input_keeps_its_target_properties(target, path):
    load_check(target)(path.read_bytes())


@pytest.mark.timeout(180)
def test_short_seeded_fuzz_run_finds_no_crash():
    pytest.importorskip("atheris", reason="atheris cannot be imported (it comes with the test extra: pip install -e '.[test]')")
    # 20000 executions per target: about 20 s for all four on a 2-core VM.
    run = subprocess.run(
        [sys.executable, "-m", "tests.fuzz", "--seed", "1", "--runs", "20000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert run.returncode == 0, f"fuzzing found a crash or broken property:\n{run.stdout}\n{run.stderr}"
    summaries = [line.split() for line in run.stdout.splitlines()]
    for target in TARGETS:
        assert [target, "ok", "execs=20000"] in [words[:3] for words in summaries], run.stdout
