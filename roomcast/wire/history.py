"""The history API's answer (PROTOCOL.md 5), one schema for both sides.

The chat service encodes `HistoryPage[MessageEvent]`; the gateway decodes
`HistoryPage[msgspec.Raw]`, so each event reaches the client byte for byte
as the chat service wrote it, never re-encoded.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import msgspec

__all__ = ["HistoryPage"]

Event = TypeVar("Event")


class HistoryPage(msgspec.Struct, Generic[Event]):
    # Field order is the order on the wire.
    room: str
    latest_seq: int
    messages: list[Event]
