"""What makes a benchmark run fail, shared by bench.fanout.run, bench.hops and loadtest/run.py.

A run that errored, lost, doubled or reordered a message has no figures
worth printing: it exits non-zero. Budgets are checked exactly on full runs;
a smoke run (tiny grid, noisy shared CI machine) checks only for a gross
breach: a figure GROSS_BREACH_FACTOR times over its budget is a regression
or a broken run, never noise.
"""

from __future__ import annotations

__all__ = ["GROSS_BREACH_FACTOR", "over_budget"]

GROSS_BREACH_FACTOR = 10.0


def over_budget(what: str, value: float, limit: float, *, gross: bool, strict: bool = False, unit: str = "ms") -> str | None:
    """A failure line when `value` misses `limit` (`< limit` if strict, else `<=`), None when it is within.

    With gross (smoke runs) the bound is GROSS_BREACH_FACTOR times the budget.
    """
    bound = limit * GROSS_BREACH_FACTOR if gross else limit
    within = value < bound if strict else value <= bound
    if within:
        return None
    kind = f"gross breach (over {GROSS_BREACH_FACTOR:g}x the budget {limit:g} {unit})" if gross else f"budget {limit:g} {unit} missed"
    return f"{what} {value:g} {unit}: {kind}"
