"""pytest set-up for bench/ (outside the default test run: pyproject's testpaths is `tests`).

    python -m pytest bench/test_micro.py --benchmark-only

Adds what a figure from a shared, noisy box needs next to it: the load average
and the CPUs this process may use, stored in the machine info of
`--benchmark-json` and printed in the header.
"""

from __future__ import annotations

import os
from typing import Any

import pytest


def _machine_extra() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return {"loadavg": [round(x, 2) for x in load], "cpus_allowed": cpus, "nproc": os.cpu_count()}


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    machine_info.update(_machine_extra())


def pytest_report_header(config: pytest.Config) -> str:
    extra = _machine_extra()
    return f"bench: nproc={extra['nproc']} cpus_allowed={extra['cpus_allowed']} loadavg={extra['loadavg']}"
