"""The picows side of a client connection: frames in, actions out, writes.

`Connection` is one socket's listener. Frames pass the RFC 6455 layer
(`FramedListener`), then the sans-I/O `Session`, whose actions the
`GatewayApp` carries out. Fan-out never goes through here per message: the
room registry holds each live socket's raw `write` and the app calls it with
the shared, pre-framed buffer.

Lifetime hazard: picows' `WSFrame` is valid only inside `on_ws_frame`; the
layer copies what it keeps.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from picows import WSMsgType, WSTransport

from gateway.adapters.framed import FramedListener
from gateway.core.session import Session
from roomcast.wire.codes import CloseCode

if TYPE_CHECKING:
    from gateway.app import GatewayApp

__all__ = ["Connection"]

log = logging.getLogger("roomcast.gateway.ws")

_TEXT = WSMsgType.TEXT


class Connection(FramedListener):
    """One client WebSocket."""

    def __init__(self, app: GatewayApp, session: Session, max_message_bytes: int) -> None:
        super().__init__(max_message_bytes)
        self.app = app
        self.session = session
        self.transport: WSTransport | None = None
        self.raw_write = _discard
        self.closed = False
        self.paused = False

    # ---- picows callbacks ----------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        underlying = transport.underlying_transport
        # Pre-framed fan-out bytes go straight to the socket: picows' own sends
        # (joined, ack, error, close) write to the same transport synchronously,
        # so the order of everything a socket receives is kept.
        self.raw_write = underlying.write
        self.app.connection_opened(self)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        self.app.connection_closed(self)

    def on_text(self, transport: WSTransport, text: str) -> None:
        self.app.perform(self, self.session.receive_text(_now_ms(), text))

    def on_binary(self, transport: WSTransport, data: bytes) -> None:
        self.app.perform(self, self.session.refuse_binary())

    def pause_writing(self) -> None:
        # The socket's buffer passed the high-water mark: from now on its
        # writes are checked against the send-buffer limit.
        self.paused = True
        self.app.connection_paused(self)

    def resume_writing(self) -> None:
        self.paused = False
        self.app.connection_resumed(self)

    # ---- writes --------------------------------------------------------------

    def send_text(self, payload: bytes) -> None:
        """A single control-path frame (joined, ack, error...)."""
        if not self.closed and self.transport is not None:
            self.transport.send(_TEXT, payload)

    def checked_write(self, data: bytes) -> None:
        """The writer of a paused socket: closes it with 4000 past the send-buffer limit."""
        if self.closed:
            return
        self.raw_write(data)
        transport = self.transport
        if transport is not None and transport.underlying_transport.get_write_buffer_size() > self.app.config.send_buffer_limit_bytes:
            self.app.slow_consumer(self)

    def end(self, code: int, reason: str = "") -> None:
        """Leave every room, send a close frame with code, disconnect. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.app.connection_closed(self)
        if self.transport is not None:
            self.close(self.transport, code, reason)

    def abort(self, code: int = CloseCode.SLOW_CONSUMER, reason: str = "") -> None:
        """Close without waiting for queued data: the socket's buffer is freed now.

        The close frame is written first, but it sits behind the queued data,
        so a peer that stopped reading will mostly see the TCP reset.
        """
        if self.closed:
            return
        self.closed = True
        self.app.connection_closed(self)
        transport = self.transport
        if transport is None:
            return
        try:
            transport.send_close(code, reason.encode())  # type: ignore[arg-type]
        except Exception:  # the transport is already going away
            pass
        transport.underlying_transport.abort()


def _discard(data: bytes) -> None:
    return None


def _now_ms() -> int:
    return int(time.time() * 1000)
