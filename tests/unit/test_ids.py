"""chat.core.ids: ULIDs, 26 Crockford base32 characters, time-ordered, monotonic."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chat.core.ids import CROCKFORD_ALPHABET, UlidGenerator, encode_ulid, is_ulid, ulid_time_ms

ULID_RE = re.compile(r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$")
T0 = 1_732_650_000_123


def test_ulid_is_26_crockford_characters() -> None:
    ulid = UlidGenerator().new(T0)
    assert ULID_RE.match(ulid), ulid
    assert set(ulid) <= set(CROCKFORD_ALPHABET)


def test_ulid_encodes_its_time_in_the_first_ten_characters() -> None:
    assert ulid_time_ms(UlidGenerator().new(T0)) == T0
    assert encode_ulid(0, 0) == "0" * 26
    assert encode_ulid((1 << 48) - 1, (1 << 80) - 1) == "7" + "Z" * 25


def test_known_vector_from_the_ulid_spec() -> None:
    # The spec's example time 1469918176385 encodes as 01ARYZ6S41.
    assert encode_ulid(1469918176385, 0)[:10] == "01ARYZ6S41"


def test_ids_of_later_milliseconds_sort_later() -> None:
    gen = UlidGenerator()
    ids = [gen.new(T0 + i * 7) for i in range(50)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 50


def test_ids_within_one_millisecond_increase_by_one() -> None:
    gen = UlidGenerator(random_bits=lambda bits: 41)
    a, b, c = gen.new(T0), gen.new(T0), gen.new(T0)
    assert a < b < c
    assert int_of(b) - int_of(a) == 1 and int_of(c) - int_of(b) == 1
    assert {ulid_time_ms(x) for x in (a, b, c)} == {T0}


def test_a_clock_stepping_back_still_gives_increasing_ids() -> None:
    gen = UlidGenerator()
    a = gen.new(T0)
    b = gen.new(T0 - 5000)
    assert b > a
    assert ulid_time_ms(b) == T0  # keeps the later time rather than going back


def test_random_part_overflow_moves_time_on_by_one_ms() -> None:
    gen = UlidGenerator(random_bits=lambda bits: (1 << bits) - 1)
    a = gen.new(T0)
    b = gen.new(T0)
    assert b > a
    assert ulid_time_ms(b) == T0 + 1


def test_random_part_comes_from_the_injected_source() -> None:
    assert UlidGenerator(random_bits=lambda bits: 0).new(T0) == encode_ulid(T0, 0)


@pytest.mark.parametrize("bad", [-1, 1 << 48])
def test_time_outside_48_bits_is_refused(bad: int) -> None:
    with pytest.raises(ValueError):
        UlidGenerator().new(bad)


def test_is_ulid_rejects_wrong_length_and_letters() -> None:
    good = UlidGenerator().new(T0)
    assert is_ulid(good)
    assert not is_ulid(good[:-1])
    assert not is_ulid(good[:-1] + "U")  # U is not in Crockford's alphabet
    assert not is_ulid("8" + good[1:])  # over 128 bits
    with pytest.raises(ValueError):
        ulid_time_ms("nope")


@given(st.lists(st.integers(min_value=0, max_value=(1 << 48) - 2), min_size=1, max_size=40))
def test_one_generator_always_makes_strictly_increasing_ids(times: list[int]) -> None:
    gen = UlidGenerator()
    ids = [gen.new(t) for t in times]
    assert all(x < y for x, y in zip(ids, ids[1:]))
    assert all(ULID_RE.match(x) for x in ids)


@given(st.integers(min_value=0, max_value=(1 << 48) - 1), st.integers(min_value=0, max_value=(1 << 80) - 1))
def test_encoding_round_trips_the_time(t: int, r: int) -> None:
    assert ulid_time_ms(encode_ulid(t, r)) == t


def int_of(ulid: str) -> int:
    n = 0
    for ch in ulid:
        n = n * 32 + CROCKFORD_ALPHABET.index(ch)
    return n
