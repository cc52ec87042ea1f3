"""How a service reads SIGTERM/SIGINT: the first drains, a later one forces the exit.

One stop often arrives more than once: a terminal's Ctrl-C signals the whole
process group (a supervisor and its workers alike) and the supervisor then
forwards it, and `roomcast dev` sends SIGTERM to children that already got
the Ctrl-C. A repeat within `SAME_STOP_S` of the first is that same stop,
not a person asking to skip the drain, so it is ignored.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = ["SAME_STOP_S", "StopAction", "StopSignals"]

SAME_STOP_S = 1.0


class StopAction(enum.Enum):
    DRAIN = "drain"
    IGNORE = "ignore"
    FORCE = "force"


@dataclass
class StopSignals:
    """Pure: feed it each signal's arrival time (monotonic), act on what it answers."""

    same_stop_s: float = SAME_STOP_S
    first_at: float | None = None

    def received(self, now: float) -> StopAction:
        if self.first_at is None:
            self.first_at = now
            return StopAction.DRAIN
        if now - self.first_at < self.same_stop_s:
            return StopAction.IGNORE
        return StopAction.FORCE
