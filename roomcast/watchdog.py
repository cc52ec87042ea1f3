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
- `REBALANCE` (from `observe_group`): a partition this member does not own
  has records waiting and its committed offset has not moved for longer than
  `orphan_after_s` (a session): its owner is gone without the group noticing (the
  embedded broker can leave a left or expired member's partitions unowned
  and never tell the others). Rejoining makes the group assign everything
  again. It does not count towards EXIT, and comes at most once a bound.

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
    REBALANCE = "rebalance"  # another member's partitions look orphaned: rejoin to make the group reassign them


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
    counter that moves whenever the member fetches records or fails an
    attempt to connect.
    """

    stall_after_s: float
    max_rejoins: int = 2
    # How long another member's partition may sit with records waiting and no
    # commit: a live owner commits every batch, a dead one is expired by Kafka
    # within a session. None: stall_after_s.
    orphan_after_s: float | None = None
    rejoins_in_a_row: int = 0
    actions: int = 0  # REJOIN and EXIT verdicts given, for a metric
    _since: float | None = None  # when the current stall began; None: not stalled
    _progress: int = -1
    _reason: str = ""
    last_reason: str = field(default="", repr=False)
    _unowned: dict[int, tuple[int | None, float]] = field(default_factory=dict, repr=False)  # committed, since
    _last_rebalance: float = float("-inf")

    def observe(self, now: float, *, in_group: bool, lag: int, progress: int) -> Verdict:
        moved = progress != self._progress
        self._progress = progress
        if in_group and (lag == 0 or moved):
            self._since = None
            self.rejoins_in_a_row = 0
            return Verdict.OK
        if not in_group and moved:
            # Out of the group but trying (a failed connection attempt counts):
            # the broker is away, which a fresh consumer or process cannot mend.
            self._since = now
            return Verdict.OK
        if self._since is None:
            self._since = now
        self._reason = "no assignment" if not in_group else f"no progress with {lag} records waiting"
        if now - self._since < self.stall_after_s:
            return Verdict.OK
        self.actions += 1
        self.last_reason = f"{self._reason} for {now - self._since:.1f} s"
        if self.rejoins_in_a_row >= self.max_rejoins:
            return Verdict.EXIT
        return Verdict.REJOIN

    def observe_group(self, now: float, unowned: dict[int, tuple[int | None, int]]) -> Verdict:
        """`unowned`: partition -> (committed offset or None, end offset), for the partitions this member does not own."""
        worst = 0.0
        for partition, (committed, end) in unowned.items():
            last = self._unowned.get(partition)
            if last is None or last[0] != committed or end <= (committed or 0):
                self._unowned[partition] = (committed, now)
                continue
            worst = max(worst, now - last[1])
        for partition in list(self._unowned):
            if partition not in unowned:
                del self._unowned[partition]
        bound = self.stall_after_s if self.orphan_after_s is None else self.orphan_after_s
        if worst < bound or now - self._last_rebalance < bound:
            return Verdict.OK
        self._last_rebalance = now
        self._unowned.clear()
        self.actions += 1
        self.last_reason = f"a partition owned by another member has had records waiting and no commit for {worst:.1f} s"
        return Verdict.REBALANCE

    def rejoined(self, now: float) -> None:
        """The member left and joined again: give the fresh consumer a whole bound."""
        self.rejoins_in_a_row += 1
        self._since = now

    def stalled_for(self, now: float) -> float:
        """Seconds the member has been out of its group or without progress (0: fine)."""
        return 0.0 if self._since is None else now - self._since
