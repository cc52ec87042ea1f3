"""Error and close codes of the wire contract (docs/PROTOCOL.md section 3)."""

from __future__ import annotations

import enum

__all__ = ["ErrorCode", "CloseCode"]


class ErrorCode(str, enum.Enum):
    """The `code` of an `error` frame. The connection stays open after one."""

    BAD_REQUEST = "bad_request"  # not JSON, not an object, schema violation
    FORBIDDEN = "forbidden"  # room not allowed by the token
    TOO_LARGE = "too_large"  # body over the limit
    RATE_LIMITED = "rate_limited"  # per-connection send budget exceeded
    UNAVAILABLE = "unavailable"  # post not accepted now; retry, same client_msg_id


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server uses."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    BINARY_FRAME = 1003  # RFC 6455 "unsupported data"
    INVALID_PAYLOAD = 1007  # RFC 6455: text frame that is not UTF-8
    ABUSE = 1008  # repeated refused frames in a short time (policy violation)
    FRAME_TOO_LARGE = 1009
    INTERNAL_ERROR = 1011
    DRAINING = 1012  # service restart: reconnect elsewhere, with `since`
    OVERLOADED = 1013  # try again later
    SLOW_CONSUMER = 4000  # send buffer passed its limit; reconnect with `since`
    TOKEN_EXPIRED = 4001  # the token's exp passed without a `refresh`: reconnect with a fresh token
    REVOKED = 4002  # an operator revoked the user (`roomcast revoke`)
    REFRESH_REFUSED = 4003  # a `refresh` carried a bad or expired token, or one for another user
