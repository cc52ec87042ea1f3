"""A benchmark run whose measurements went wrong must fail, not print figures and exit 0."""

from bench.fanout.run import measurement_problems


def _cell(**over: object) -> dict[str, object]:
    return {"kind": "fanout", "rooms": 2, "members": 5, "mode": "max", "server": "roomcast", "run": 1,
            "lost": 0, "dup": 0, "out_of_order": 0, "undelivered": 0, **over}


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
