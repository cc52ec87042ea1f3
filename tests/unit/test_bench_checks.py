"""A benchmark run whose measurements went wrong must fail, not print figures and exit 0."""

from bench.checks import GROSS_BREACH_FACTOR, over_budget
from bench.fanout.run import gross_breaches, measurement_problems


def _cell(**over: object) -> dict[str, object]:
    return {"kind": "fanout", "rooms": 2, "members": 5, "mode": "max", "server": "roomcast", "run": 1,
            "deliveries": 100, "expected": 100, "lost": 0, "dup": 0, "out_of_order": 0, "undelivered": 0,
            "zero_receivers": 0, "closed_conns": 0, "error_frames": 0, "timed_out": False, **over}


def test_a_clean_run_has_no_problems() -> None:
    assert measurement_problems([_cell(), _cell(server="baseline")]) == []


def test_errors_losses_duplicates_and_reorderings_are_problems() -> None:
    problems = measurement_problems([
        _cell(error="ConnectionRefusedError: the server died"),
        _cell(lost=3),
        _cell(dup=1, out_of_order=2),
        _cell(undelivered=5),
    ])
    assert problems == [
        "fanout 2x5 max roomcast run 1: ConnectionRefusedError: the server died",
        "fanout 2x5 max roomcast run 1: lost 3",
        "fanout 2x5 max roomcast run 1: dup 1, out_of_order 2",
        "fanout 2x5 max roomcast run 1: undelivered 5",
    ]


def test_a_dead_or_silent_server_is_a_problem() -> None:
    # What bench/fanout/test_smoke.py checked, now in the run's own exit status.
    problems = measurement_problems([
        _cell(deliveries=0, expected=0),
        _cell(deliveries=90),
        _cell(zero_receivers=4, closed_conns=2),
        _cell(error_frames=1, timed_out=True),
    ])
    assert problems == [
        "fanout 2x5 max roomcast run 1: delivered nothing",
        "fanout 2x5 max roomcast run 1: delivered 90 of 100",
        "fanout 2x5 max roomcast run 1: zero_receivers 4, closed_conns 2",
        "fanout 2x5 max roomcast run 1: error_frames 1, timed_out True",
    ]


def test_over_budget_is_exact_on_full_runs_and_gross_on_smoke_runs() -> None:
    assert over_budget("p99", 2.0, 2.0, gross=False) is None
    assert over_budget("p99", 2.0, 2.0, gross=False, strict=True) == "p99 2 ms: budget 2 ms missed"
    assert over_budget("p99", 19.0, 2.0, gross=True) is None
    assert over_budget("p99", 2.0 * GROSS_BREACH_FACTOR + 1, 2.0, gross=True) == "p99 21 ms: gross breach (over 10x the budget 2 ms)"


def test_a_fixed_rate_cell_ten_times_over_the_latency_target_fails_the_run() -> None:
    rows = [
        {"rooms": 2, "members": 5, "mode": "fixed", "server": "roomcast", "p99_us": 25_000.0},
        {"rooms": 2, "members": 5, "mode": "fixed", "server": "baseline", "p99_us": 90_000.0},  # not ours
        {"rooms": 2, "members": 5, "mode": "max", "server": "roomcast", "p99_us": 90_000.0},  # saturated on purpose
        {"rooms": 1, "members": 9, "mode": "fixed", "server": "roomcast", "p99_us": 900.0},
    ]
    assert gross_breaches({"rows": rows}) == ["2x5 fixed p99 25000 us: gross breach (over 10x the budget 2000 us)"]
