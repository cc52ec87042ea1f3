"""Per-connection limits: the send budget and the abuse counter. Clock passed in."""

from __future__ import annotations

from collections import deque

__all__ = ["TokenBucket", "AbuseCounter"]


class TokenBucket:
    """`rate_per_s` tokens a second up to `burst`; take() spends one if there is one."""

    __slots__ = ("rate_per_ms", "burst", "tokens", "updated_ms")

    def __init__(self, rate_per_s: float, burst: int, now_ms: int) -> None:
        self.rate_per_ms = rate_per_s / 1000.0
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated_ms = now_ms

    def take(self, now_ms: int) -> bool:
        elapsed = now_ms - self.updated_ms
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate_per_ms)
            self.updated_ms = now_ms
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class AbuseCounter:
    """Counts refused frames in a sliding window; `record()` says when the limit is passed.

    A fixed ring of timestamps: memory is bounded by `max_errors` whatever the
    client sends.
    """

    __slots__ = ("max_errors", "window_ms", "stamps")

    def __init__(self, max_errors: int, window_ms: int) -> None:
        self.max_errors = max_errors
        self.window_ms = window_ms
        self.stamps: deque[int] = deque(maxlen=max_errors + 1)

    def record(self, now_ms: int) -> bool:
        """Note one refused frame; True when more than max_errors fell within the window."""
        stamps = self.stamps
        stamps.append(now_ms)  # the oldest falls off past max_errors + 1
        cutoff = now_ms - self.window_ms
        while stamps and stamps[0] <= cutoff:
            stamps.popleft()
        return len(stamps) > self.max_errors
