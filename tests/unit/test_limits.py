"""The send budget and the abuse counter; the clock is always passed in."""

from __future__ import annotations

import pytest

from gateway.core.limits import AbuseCounter, TokenBucket

# ---- TokenBucket ------------------------------------------------------------------


def test_bucket_starts_full_and_allows_the_burst_at_once():
    bucket = TokenBucket(rate_per_s=10.0, burst=5, now_ms=1_000)
    assert [bucket.take(1_000) for _ in range(5)] == [True] * 5


def test_bucket_refuses_once_the_burst_is_spent():
    bucket = TokenBucket(rate_per_s=10.0, burst=5, now_ms=1_000)
    for _ in range(5):
        bucket.take(1_000)
    assert bucket.take(1_000) is False
    assert bucket.take(1_000) is False


def test_bucket_refills_one_token_per_interval():
    # 10/s: one token every 100 ms.
    bucket = TokenBucket(rate_per_s=10.0, burst=2, now_ms=0)
    assert bucket.take(0) and bucket.take(0)
    assert not bucket.take(99)
    assert bucket.take(100)
    assert not bucket.take(100)
    assert not bucket.take(150)
    assert bucket.take(200)


def test_bucket_refill_accumulates_over_several_intervals():
    bucket = TokenBucket(rate_per_s=10.0, burst=5, now_ms=0)
    for _ in range(5):
        bucket.take(0)
    assert [bucket.take(300) for _ in range(4)] == [True, True, True, False]


def test_bucket_never_holds_more_than_the_burst():
    bucket = TokenBucket(rate_per_s=10.0, burst=3, now_ms=0)
    for _ in range(3):
        bucket.take(0)
    later = 3_600_000  # an hour idle
    assert [bucket.take(later) for _ in range(4)] == [True, True, True, False]


def test_bucket_refused_takes_do_not_spend_tokens():
    bucket = TokenBucket(rate_per_s=10.0, burst=1, now_ms=0)
    assert bucket.take(0)
    for t in range(0, 100, 10):
        assert not bucket.take(t)
    # Refused takes neither spend nor lose the time that passed: 1.5 tokens by 150 ms.
    assert bucket.take(150)
    assert not bucket.take(150)


def test_bucket_gains_nothing_from_a_clock_going_backwards():
    bucket = TokenBucket(rate_per_s=10.0, burst=1, now_ms=10_000)
    assert bucket.take(10_000)
    assert not bucket.take(5_000)
    assert not bucket.take(10_050)
    assert bucket.take(10_100)


def test_bucket_with_fractional_rate():
    bucket = TokenBucket(rate_per_s=0.5, burst=1, now_ms=0)  # one post every 2 s
    assert bucket.take(0)
    assert not bucket.take(1_999)
    assert bucket.take(2_000)


# ---- AbuseCounter ---------------------------------------------------------------


def test_abuse_counter_allows_up_to_max_errors_in_the_window():
    counter = AbuseCounter(max_errors=3, window_ms=1_000)
    assert [counter.record(t) for t in (0, 1, 2)] == [False, False, False]


def test_abuse_counter_trips_on_one_more_than_max_errors_in_the_window():
    counter = AbuseCounter(max_errors=3, window_ms=1_000)
    for t in (0, 1, 2):
        counter.record(t)
    assert counter.record(999) is True


def test_abuse_counter_does_not_trip_when_errors_are_spread_out():
    counter = AbuseCounter(max_errors=3, window_ms=1_000)
    # One error every 400 ms: never more than 3 in any 1000 ms.
    assert not any(counter.record(t) for t in range(0, 40_000, 400))


def test_abuse_counter_forgets_errors_older_than_the_window():
    counter = AbuseCounter(max_errors=3, window_ms=1_000)
    for t in (0, 1, 2):
        counter.record(t)
    # 0, 1 and 2 have left the window by 1500: three more fit before it trips again.
    assert [counter.record(t) for t in (1_500, 1_501, 1_502)] == [False, False, False]
    assert counter.record(1_503) is True


def test_abuse_counter_keeps_errors_just_inside_the_window():
    counter = AbuseCounter(max_errors=3, window_ms=1_000)
    for t in (0, 1, 2):
        counter.record(t)
    assert counter.record(1_000) is False  # 0 is exactly window_ms old: out
    assert counter.record(1_001) is False  # 1 is out
    assert counter.record(1_001) is True  # 2, 1000, 1001, 1001: four within (1, 1001]


def test_abuse_counter_counts_a_burst_after_a_quiet_period_from_zero():
    counter = AbuseCounter(max_errors=2, window_ms=1_000)
    counter.record(0)
    counter.record(1)
    assert [counter.record(t) for t in (5_000, 5_001)] == [False, False]
    assert counter.record(5_002) is True


@pytest.mark.parametrize("max_errors", [1, 5, 30])
def test_abuse_counter_trips_exactly_at_max_errors_plus_one(max_errors):
    counter = AbuseCounter(max_errors=max_errors, window_ms=10_000)
    results = [counter.record(100 + i) for i in range(max_errors + 1)]
    assert results == [False] * max_errors + [True]


def test_abuse_counter_memory_is_bounded_by_max_errors():
    counter = AbuseCounter(max_errors=3, window_ms=10_000)
    for _ in range(10_000):
        counter.record(500)
    assert len(counter.stamps) <= counter.max_errors + 1
