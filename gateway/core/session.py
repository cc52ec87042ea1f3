"""Per-socket protocol state: a text frame in, the things to do out.

`Session.receive_text(now_ms, text)` parses one client frame (PROTOCOL.md 2),
applies the per-connection rules (room permissions, body size, send budget,
abuse counter) and returns actions for the adapter. It never touches a socket,
so every rule is tested without one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gateway.core.limits import AbuseCounter, TokenBucket
from roomcast.wire.codes import CloseCode, ErrorCode
from roomcast.wire.events import IngestRecord
from roomcast.wire.frames import DEFAULT_MAX_BODY_BYTES, FrameError, Join, Leave, Refresh, Send, decode_client_frame, encode_error, encode_left, encode_refreshed

__all__ = ["SessionLimits", "Session", "Reply", "JoinRoom", "LeaveRoom", "Post", "CheckToken", "Close", "Action"]


@dataclass(frozen=True, slots=True)
class SessionLimits:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    send_rate_per_s: float = 20.0
    send_burst: int = 40
    abuse_max_errors: int = 30
    abuse_window_ms: int = 10_000
    max_rooms: int = 256


@dataclass(frozen=True, slots=True)
class Reply:
    """Send this text frame payload to the socket."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class JoinRoom:
    room: str
    since: int | None


@dataclass(frozen=True, slots=True)
class LeaveRoom:
    """Leave the room and answer `left` (with `reason` when the server made the socket leave)."""

    room: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Post:
    """Produce this record; answer `ack` once the broker acked it, else `unavailable`."""

    record: IngestRecord


@dataclass(frozen=True, slots=True)
class CheckToken:
    """Verify this `refresh` token, then call `Session.refreshed` or `Session.refresh_refused`."""

    token: str


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str


Action = Reply | JoinRoom | LeaveRoom | Post | CheckToken | Close


def _allow_all(room: str) -> bool:
    return True


class Session:
    """One client connection's protocol state."""

    __slots__ = ("user", "gateway", "limits", "rooms", "exp", "issued_at", "_may_use", "_new_msg_id", "_budget", "_abuse", "closed")

    def __init__(
        self,
        user: str,
        gateway: str,
        limits: SessionLimits,
        new_msg_id: Callable[[], str],
        may_use_room: Callable[[str], bool] = _allow_all,
        exp: float | None = None,
        issued_at: float | None = None,
    ) -> None:
        self.user = user
        # The token's exp and iat (seconds since the epoch): when the socket
        # must be closed (None: never, dev mode), and which revocations cover it.
        self.exp = exp
        self.issued_at = issued_at
        self.gateway = gateway
        self.limits = limits
        # A list, not a set: a socket is in one or a few rooms, and an idle
        # socket's memory decides connections per worker (216 vs 64 bytes).
        self.rooms: list[str] = []
        self._may_use = may_use_room
        self._new_msg_id = new_msg_id
        # Made on first use: most sockets never post or err, and an idle
        # socket's memory is the budget that decides connections per worker.
        self._budget: TokenBucket | None = None
        self._abuse: AbuseCounter | None = None
        self.closed = False

    def receive_text(self, now_ms: int, text: str | bytes) -> list[Action]:
        """Handle one complete client text frame. Never raises for bad input."""
        if self.closed:
            return []
        try:
            frame = decode_client_frame(text)
            if type(frame) is Send:
                return [self._send(now_ms, frame)]
            if type(frame) is Join:
                return [self._join(frame)]
            if type(frame) is Refresh:
                return [CheckToken(frame.token)]
            return self._leave(frame)  # type: ignore[arg-type]
        except FrameError as exc:
            return self._refuse(now_ms, exc)

    def refreshed(
        self, user: str, exp: float | None, issued_at: float | None, may_use_room: Callable[[str], bool] | None
    ) -> list[Action]:
        """A `refresh` token checked out: its `exp` and rooms apply from now on.

        A token of another user closes with 4003; each joined room the new
        token does not allow is left with reason `forbidden`. `may_use_room`
        None: every room.
        """
        if self.closed:
            return []
        if user != self.user:
            return self.refresh_refused("token is for another user")
        self.exp = exp
        self.issued_at = issued_at
        may_use_room = self._may_use = may_use_room or _allow_all
        actions: list[Action] = [Reply(encode_refreshed(exp or 0))]
        for room in [room for room in self.rooms if not may_use_room(room)]:
            self.rooms.remove(room)
            actions.append(LeaveRoom(room, "forbidden"))
        return actions

    def refresh_refused(self, reason: str) -> list[Action]:
        """A `refresh` token was bad or expired: PROTOCOL.md 9 closes with 4003."""
        if self.closed:
            return []
        self.closed = True
        return [Close(CloseCode.REFRESH_REFUSED, f"refresh refused: {reason}")]

    def expired(self) -> list[Action]:
        """The token's exp passed with no refresh: close with 4001."""
        if self.closed:
            return []
        self.closed = True
        return [Close(CloseCode.TOKEN_EXPIRED, "token expired; reconnect with a fresh token")]

    def refuse_binary(self) -> list[Action]:
        """A binary frame: PROTOCOL.md 1 closes with 1003."""
        self.closed = True
        return [Close(CloseCode.BINARY_FRAME, "binary frames are not supported")]

    def _refuse(self, now_ms: int, exc: FrameError) -> list[Action]:
        actions: list[Action] = [Reply(encode_error(exc.code, exc.message, exc.ref))]
        if self._abuse is None:
            self._abuse = AbuseCounter(self.limits.abuse_max_errors, self.limits.abuse_window_ms)
        if self._abuse.record(now_ms):
            self.closed = True
            actions.append(Close(CloseCode.ABUSE, "too many refused frames"))
        return actions

    def _check_room(self, room: str, ref: str) -> None:
        if not self._may_use(room):
            raise FrameError(ErrorCode.FORBIDDEN, f"room {room} is not allowed by your token", ref)

    def _join(self, frame: Join) -> Action:
        self._check_room(frame.room, "join")
        if frame.room not in self.rooms and len(self.rooms) >= self.limits.max_rooms:
            raise FrameError(ErrorCode.BAD_REQUEST, f"too many rooms joined (limit {self.limits.max_rooms}); leave one first", "join")
        if frame.room not in self.rooms:
            self.rooms.append(frame.room)
        return JoinRoom(frame.room, frame.since)

    def _leave(self, frame: Leave) -> list[Action]:
        if frame.room in self.rooms:
            self.rooms.remove(frame.room)
            return [LeaveRoom(frame.room)]
        return [Reply(encode_left(frame.room))]  # leaving a room not joined is a no-op

    def _send(self, now_ms: int, frame: Send) -> Action:
        ref = frame.client_msg_id or "message.send"
        self._check_room(frame.room, ref)
        body = frame.body
        # len(str) <= UTF-8 bytes <= 4 * len(str): encode only when it could matter.
        if len(body) * 4 > self.limits.max_body_bytes and len(body.encode()) > self.limits.max_body_bytes:
            raise FrameError(ErrorCode.TOO_LARGE, f"body is over {self.limits.max_body_bytes} bytes", ref)
        if not body:
            raise FrameError(ErrorCode.BAD_REQUEST, "body is empty", ref)
        if self._budget is None:
            # Full, as a bucket made at the opening would be by now (it never holds more than burst).
            self._budget = TokenBucket(self.limits.send_rate_per_s, self.limits.send_burst, now_ms)
        if not self._budget.take(now_ms):
            raise FrameError(ErrorCode.RATE_LIMITED, "too many messages; slow down", ref)
        record = IngestRecord(
            room=frame.room,
            user=self.user,
            body=body,
            client_msg_id=frame.client_msg_id or self._new_msg_id(),
            gateway=self.gateway,
            received_at=now_ms,
        )
        return Post(record)
