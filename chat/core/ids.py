"""Message ids: ULIDs (26 characters of Crockford base32, time-ordered).

A ULID is 48 bits of milliseconds since the Unix epoch followed by 80 random
bits (https://github.com/ulid/spec). The generator is monotonic: within one
millisecond, or when the clock steps back, it increments the random part of the
previous id instead of drawing a new one, so ids from one generator sort in the
order they were made. Time is passed in; randomness is injectable for tests.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

__all__ = ["CROCKFORD_ALPHABET", "ULID_LENGTH", "UlidGenerator", "encode_ulid", "is_ulid", "ulid_time_ms"]

CROCKFORD_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ULID_LENGTH = 26
_MAX_TIME_MS = (1 << 48) - 1
_RANDOM_BITS = 80
_MAX_RANDOM = (1 << _RANDOM_BITS) - 1
_DECODE = {c: i for i, c in enumerate(CROCKFORD_ALPHABET)}


def encode_ulid(time_ms: int, randomness: int) -> str:
    """The ULID of a 48-bit millisecond time and 80 random bits.

    Raises ValueError when either is out of range.
    """
    if not 0 <= time_ms <= _MAX_TIME_MS:
        raise ValueError(f"ulid time {time_ms} is outside 0..2**48-1 ms")
    if not 0 <= randomness <= _MAX_RANDOM:
        raise ValueError("ulid randomness must fit in 80 bits")
    n = (time_ms << _RANDOM_BITS) | randomness
    out = [""] * ULID_LENGTH
    for i in range(ULID_LENGTH - 1, -1, -1):
        out[i] = CROCKFORD_ALPHABET[n & 31]
        n >>= 5
    return "".join(out)


def is_ulid(text: str) -> bool:
    """True for 26 upper-case Crockford base32 characters within the 128-bit range."""
    return len(text) == ULID_LENGTH and text[0] <= "7" and all(c in _DECODE for c in text)


def ulid_time_ms(ulid: str) -> int:
    """The millisecond time encoded in a ULID. Raises ValueError if it is not one."""
    if not is_ulid(ulid):
        raise ValueError(f"not a ULID: {ulid!r}")
    n = 0
    for c in ulid[:10]:
        n = (n << 5) | _DECODE[c]
    return n


class UlidGenerator:
    """Makes strictly increasing ULIDs. Not thread-safe: one per writer.

    `random_bits(k)` returns a random int of k bits (default: `secrets`).
    """

    __slots__ = ("_last_ms", "_last_random", "_random_bits")

    def __init__(self, random_bits: Callable[[int], int] = secrets.randbits) -> None:
        self._random_bits = random_bits
        self._last_ms = -1
        self._last_random = 0

    def new(self, now_ms: int) -> str:
        """A ULID for time `now_ms`, greater than every id this generator made before.

        If `now_ms` is not after the previous id's time (same millisecond, or the
        clock stepped back) the previous time is kept and the random part is
        incremented; when that overflows, the time moves on by 1 ms.
        Raises ValueError when `now_ms` is outside 0..2**48-1.
        """
        if now_ms > self._last_ms:
            if now_ms > _MAX_TIME_MS or now_ms < 0:
                raise ValueError(f"ulid time {now_ms} is outside 0..2**48-1 ms")
            self._last_ms = now_ms
            self._last_random = self._random_bits(_RANDOM_BITS)
        elif self._last_random < _MAX_RANDOM:
            self._last_random += 1
        else:
            self._last_ms += 1
            self._last_random = self._random_bits(_RANDOM_BITS)
        return encode_ulid(self._last_ms, self._last_random)
