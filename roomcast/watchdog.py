"""Liveness of a consumer-group member, as pure logic (no I/O, no clock of its own).

A member can stop relaying for good while everything around it looks alive:
its group never finishes a rebalance, or its loop waits on something that
never answers, while posts are still acked upstream. The adapter feeds the
watchdog what it sees, a few times a second, and acts on the verdict:

- `OK`: nothing to do.
- `REJOIN`: the member has been out of a settled group, or has made no
  progress while records wait for it, for longer than `stall_after_s`: leave
  the group and join again with a fresh consumer.
- `EXIT`: `max_rejoins` rejoins in a row did not help: exit non-zero, so the
  supervisor (or Kubernetes) starts a fresh process.

A member with nothing to do (lag 0) is never stalled: an idle group is fine.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["Verdict", "ConsumerWatchdog", "stall_bound_s"]


class Verdict(enum.Enum):
    OK = "ok"
    REJOIN = "rejoin"
    EXIT = "exit"


def stall_bound_s(session_timeout_ms: int, rebalance_timeout_ms: int) -> float:
    """How long a member may be out of its group, or stuck with records waiting, before it rejoins.

    A healthy rebalance ends within the rebalance timeout once a dead member's
    session has expired, so a member still without an assignment after both
    (and a heartbeat's worth of slack, a fifth of the session) is stuck.
    """
    return (session_timeout_ms * 1.2 + rebalance_timeout_ms) / 1000


@dataclass
class ConsumerWatchdog:
    """Decides when a consumer-group member is stuck. Feed it with `observe`.

    `in_group`: the member holds an assignment from a finished rebalance (it
    may be empty). `lag`: records waiting on its partitions. `progress`: a
    counter that moves whenever the member fetches records.
    """

    stall_after_s: float
    max_rejoins: int = 2
    rejoins_in_a_row: int = 0
    actions: int = 0  # REJOIN and EXIT verdicts given, for a metric
    _since: float | None = None  # when the current stall began; None: not stalled
    _progress: int = -1
    _reason: str = ""
    last_reason: str = field(default="", repr=False)

    def observe(self, now: float, *, in_group: bool, lag: int, progress: int) -> Verdict:
        moved = progress != self._progress
        self._progress = progress
        if in_group and (lag == 0 or moved):
            self._since = None
            self.rejoins_in_a_row = 0
            return Verdict.OK
        if self._since is None or (in_group and moved):
            self._since = now
        self._reason = "no assignment" if not in_group else f"no progress with {lag} records waiting"
        if now - self._since < self.stall_after_s:
            return Verdict.OK
        self.actions += 1
        self.last_reason = f"{self._reason} for {now - self._since:.1f} s"
        if self.rejoins_in_a_row >= self.max_rejoins:
            return Verdict.EXIT
        return Verdict.REJOIN

    def rejoined(self, now: float) -> None:
        """The member left and joined again: give the fresh consumer a whole bound."""
        self.rejoins_in_a_row += 1
        self._since = now

    def stalled_for(self, now: float) -> float:
        """Seconds the member has been out of its group or without progress (0: fine)."""
        return 0.0 if self._since is None else now - self._since
