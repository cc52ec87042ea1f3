"""Operator commands every gateway must hear: the control channel (docs/PROTOCOL.md 9).

`roomcast revoke` records a revocation in the Redis hash `REVOKED_HASH` (so a
gateway that starts or reconnects later reads it) and PUBLISHes it on
`CONTROL_CHANNEL` (so every running gateway acts on it within milliseconds).
"""

from __future__ import annotations

from typing import Union

import msgspec

__all__ = ["CONTROL_CHANNEL", "REVOKED_HASH", "Revoke", "Lift", "ControlCommand", "encode_control", "decode_control"]

CONTROL_CHANNEL = "roomcast:control"
"""Pub/sub channel of operator commands (not `room:`-prefixed: no client can join it)."""

REVOKED_HASH = "roomcast:revoked"
"""Redis hash: user id -> the moment of its revocation (seconds since the epoch, as text)."""


class Revoke(msgspec.Struct, tag_field="op", tag="revoke", frozen=True):
    user: str
    at: float


class Lift(msgspec.Struct, tag_field="op", tag="lift", frozen=True):
    user: str


ControlCommand = Union[Revoke, Lift]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ControlCommand)


def encode_control(command: ControlCommand) -> bytes:
    return _encoder.encode(command)


def decode_control(data: bytes) -> ControlCommand:
    """Raises msgspec.DecodeError (ValidationError included) for anything else."""
    return _decoder.decode(data)
