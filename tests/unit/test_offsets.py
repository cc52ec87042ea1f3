"""OffsetGapGuard: records past a hole in a partition's offsets wait until it fills."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from roomcast.offsets import Admission, OffsetGapGuard

P = ("message.ingest", 0)


def test_contiguous_records_all_pass_and_advance_the_expectation():
    guard = OffsetGapGuard()
    guard.expect(P, 10)
    assert guard.admit(P, [10, 11, 12], 0.0) == Admission(0, 3, None)
    assert guard.admit(P, [13], 0.0) == Admission(0, 1, None)
    assert guard.holes_waited == 0


def test_a_hole_inside_a_fetch_keeps_the_records_before_it_and_refetches_from_it():
    guard = OffsetGapGuard()
    guard.expect(P, 3822)
    # Measured on Tansu: 3825 and 3826 showed up in a later fetch than 3827.
    assert guard.admit(P, [3822, 3823, 3824, 3827], 0.0) == Admission(0, 3, 3825)
    assert guard.holes_waited == 1
    # Refetched once the hole filled: everything from 3825 on passes.
    assert guard.admit(P, [3825, 3826, 3827, 3828], 0.01) == Admission(0, 4, None)


def test_a_hole_between_fetches_holds_the_whole_fetch_back():
    guard = OffsetGapGuard()
    guard.expect(P, 1823)
    assert guard.admit(P, [1824, 1825], 0.0) == Admission(0, 0, 1823)
    assert guard.admit(P, [1823, 1824, 1825], 0.005) == Admission(0, 3, None)


def test_records_already_processed_are_skipped_after_a_seek_back():
    guard = OffsetGapGuard()
    guard.expect(P, 5)
    assert guard.admit(P, [5, 6, 8], 0.0) == Admission(0, 2, 7)
    # The broker hands back from where aiokafka stood if the seek raced a fetch.
    assert guard.admit(P, [6, 7, 8], 0.01) == Admission(1, 3, None)


def test_a_hole_that_never_fills_is_given_up_on_after_the_patience():
    guard = OffsetGapGuard(patience_s=2.0)
    guard.expect(P, 100)
    assert guard.admit(P, [102, 103], 0.0).refetch_from == 100
    assert guard.admit(P, [102, 103], 1.9).refetch_from == 100
    # A compacted topic or an aborted transaction leaves holes for good.
    assert guard.admit(P, [102, 103], 2.0) == Admission(0, 2, None)
    assert guard.holes_skipped == 1
    assert guard.admit(P, [104], 2.0) == Admission(0, 1, None)


def test_a_new_hole_gets_its_own_patience():
    guard = OffsetGapGuard(patience_s=1.0)
    guard.expect(P, 0)
    assert guard.admit(P, [1], 0.0).refetch_from == 0
    assert guard.admit(P, [0, 1, 3], 0.9) == Admission(0, 2, 2)
    # The hole at 2 was first seen at 0.9, so it is still waited on at 1.5.
    assert guard.admit(P, [3], 1.5).refetch_from == 2


def test_an_unknown_start_takes_the_first_record_and_forget_clears_partitions():
    guard = OffsetGapGuard()
    assert not guard.knows(P)
    assert guard.admit(P, [40, 41], 0.0) == Admission(0, 2, None)
    assert guard.knows(P)
    guard.forget([P])
    assert not guard.knows(P)
    guard.expect(P, None)
    assert not guard.knows(P)


def test_an_empty_fetch_changes_nothing():
    guard = OffsetGapGuard()
    assert guard.admit(P, [], 0.0) == Admission(0, 0, None)
    assert not guard.knows(P)  # an unknown start stays unknown
    guard.expect(P, 7)
    assert guard.admit(P, [], 0.0) == Admission(0, 0, None)
    assert guard.admit(P, [7], 0.0) == Admission(0, 1, None)


def test_partitions_are_independent():
    guard = OffsetGapGuard()
    other = ("message.ingest", 1)
    guard.expect(P, 0)
    guard.expect(other, 0)
    assert guard.admit(P, [1], 0.0).refetch_from == 0
    assert guard.admit(other, [0, 1], 0.0) == Admission(0, 2, None)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=60), st.randoms(use_true_random=False))
def test_any_order_of_visibility_yields_every_offset_once_in_order(count, rng: random.Random):
    """Records become visible in any order; each fetch returns the visible ones from the position on.

    However the broker interleaves visibility, the consumer behind the guard
    processes 0..count-1 exactly once, in order (the patience never expires here).
    """
    visible: set[int] = set()
    hidden = list(range(count))
    rng.shuffle(hidden)
    guard = OffsetGapGuard(patience_s=1e9)
    guard.expect(P, 0)
    position, processed, now = 0, [], 0.0
    while len(processed) < count:
        if hidden and rng.random() < 0.6:
            visible.add(hidden.pop())
        fetched = sorted(o for o in visible if o >= position)[: rng.randint(1, 8)]
        now += 0.001
        if not fetched:
            continue
        admission = guard.admit(P, fetched, now)
        processed.extend(fetched[admission.skip : admission.keep])
        position = admission.refetch_from if admission.refetch_from is not None else fetched[-1] + 1
    assert processed == list(range(count))
