"""Who may stay connected, after the upgrade: token expiry, refresh, operator revocation.

The upgrade checks a token once; this keeps checking for the socket's life
(PROTOCOL.md 9):

- at the token's `exp` the socket is closed with 4001, unless a `refresh`
  frame brought a valid token first (answered `refreshed`; a bad one, or one
  for another user, closes with 4003);
- `roomcast revoke USER` closes every socket of the user on every gateway
  with 4002 (the control channel), and from then on refuses the user's tokens
  issued before the revocation (the Redis hash, read at start and after each
  reconnect, so a gateway that missed the message still learns of it).

One heap of deadlines and one timer per worker, not a timer per socket: an
idle socket's memory decides connections per worker.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING

import msgspec

from gateway.core.deadlines import Deadlines
from gateway.core.session import Action, Close
from roomcast.auth import AuthError, Authenticator, Identity
from roomcast.revocation import Revocations
from roomcast.wire.codes import CloseCode
from roomcast.wire.control import Lift, Revoke, decode_control

if TYPE_CHECKING:
    from gateway.adapters.websocket import Connection

__all__ = ["AccessGuard"]

log = logging.getLogger("roomcast.gateway.access")

# Closed sockets stay in the deadline heap until their exp; past this many
# dead entries beyond the live sockets, they are swept out in one pass.
_DEAD_ENTRIES_SWEEP = 1024


class AccessGuard:
    """Token lifetime and revocation for one gateway worker's sockets.

    `perform(conn, actions)` carries out the session actions this produces
    (closes, replies, leaves); `connections()` lists the worker's open sockets.
    """

    def __init__(
        self,
        auth: Authenticator,
        perform: Callable[[Connection, list[Action]], None],
        connections: Callable[[], Collection[Connection]],
        now: Callable[[], float] = time.time,
    ) -> None:
        self.auth = auth
        self.revocations = Revocations()
        self._perform = perform
        self._connections = connections
        self._now = now
        self._deadlines: Deadlines[Connection] = Deadlines()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self.expired = 0
        self.revoked = 0
        self.refreshed = 0
        # Readiness waits for the first read of the revocation hash: a pod
        # must not take traffic while it would admit revoked tokens.
        self.loaded = False

    def admit(self, headers: Mapping[str, str], query: str) -> Identity:
        """The identity of an upgrade. Raises AuthError (the 401 body) for a bad or revoked token."""
        identity = self.auth.authenticate(headers, query)
        if self.revocations.refuses(identity.user, identity.issued_at):
            raise AuthError("token revoked; ask for a new one")
        return identity

    def watch(self, conn: Connection) -> None:
        """Close `conn` at its session's exp (call after the upgrade and after each refresh)."""
        exp = conn.session.exp
        if exp is None:
            return
        self._deadlines.add(exp, conn)
        if exp < self._timer_at:
            self._arm(exp)
        if len(self._deadlines) > _DEAD_ENTRIES_SWEEP + 2 * len(self._connections()):
            self._deadlines.retain(lambda c: not c.closed)

    def refresh(self, conn: Connection, token: str) -> None:
        """Answer a `refresh` frame: `refreshed` and a new deadline, or a 4003 close."""
        session = conn.session
        try:
            identity = self.auth.verify(token)
            if self.revocations.refuses(identity.user, identity.issued_at):
                raise AuthError("token revoked")
        except AuthError as exc:
            self._perform(conn, session.refresh_refused(str(exc)))
            return
        may_use = identity.may_use if identity.rooms is not None else None
        actions = session.refreshed(identity.user, identity.exp, identity.issued_at, may_use)
        self._perform(conn, actions)
        if not session.closed:
            self.refreshed += 1
            self.watch(conn)

    def on_control(self, payload: bytes) -> None:
        """A command on the control channel."""
        try:
            command = decode_control(payload)
        except msgspec.DecodeError as exc:
            log.warning("ignored a malformed control message (%s): %r", exc, payload[:200])
            return
        if type(command) is Revoke:
            log.warning("user %s revoked at %.3f: closing their sockets", command.user, command.at)
            self.revocations.revoke(command.user, command.at)
            self._close_revoked()
        elif type(command) is Lift:
            log.warning("revocation of user %s lifted", command.user)
            self.revocations.lift(command.user)

    def load(self, stored: Mapping[bytes, bytes]) -> None:
        """The revocation hash as read from Redis (at start and after a reconnect)."""
        revoked: dict[str, float] = {}
        for user, at in stored.items():
            try:
                revoked[user.decode()] = float(at)
            except (UnicodeDecodeError, ValueError):
                log.warning("ignored a malformed revocation entry %r: %r", user, at)
        self.revocations.replace(revoked)
        self.loaded = True
        self._close_revoked()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _close_revoked(self) -> None:
        refuses = self.revocations.refuses
        for conn in list(self._connections()):
            session = conn.session
            if not session.closed and refuses(session.user, session.issued_at):
                self.revoked += 1
                session.closed = True
                self._perform(conn, [Close(CloseCode.REVOKED, "user revoked by an operator")])

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = asyncio.get_running_loop().call_later(max(0.0, at - self._now()), self._expire_due)

    def _expire_due(self) -> None:
        self._timer, self._timer_at = None, math.inf
        now = self._now()
        for conn in self._deadlines.due(now):
            exp = conn.session.exp
            # A refreshed socket's old entry: its new one is further on.
            if not conn.closed and exp is not None and exp <= now:
                self.expired += 1
                self._perform(conn, conn.session.expired())
        next_at = self._deadlines.next_at()
        if next_at is not None:
            self._arm(next_at)
