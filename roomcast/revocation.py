"""Which tokens an operator has revoked: pure, no I/O.

A revocation of user U at time T refuses every token of U issued at or
before T (its `iat`; a token without `iat` counts as issued before), and
closes U's open sockets. Tokens issued after T work again, so a revoked user
can be let back in by issuing a new token; `lift` forgets the revocation.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["Revocations"]


class Revocations:
    """The revocations a gateway knows of: user id -> moment of revocation."""

    def __init__(self) -> None:
        self._at: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._at)

    def revoke(self, user: str, at: float) -> None:
        # The latest revocation wins: a replayed older one must not shorten it.
        self._at[user] = max(at, self._at.get(user, at))

    def lift(self, user: str) -> None:
        self._at.pop(user, None)

    def replace(self, revoked: Mapping[str, float]) -> None:
        """Take the whole list as stored (at start-up and after a Redis reconnect)."""
        self._at = dict(revoked)

    def refuses(self, user: str, issued_at: float | None) -> bool:
        """Whether a token of `user` issued at `issued_at` (its `iat`; None: unknown) is revoked."""
        at = self._at.get(user)
        if at is None:
            return False
        return issued_at is None or issued_at <= at
