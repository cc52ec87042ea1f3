"""The picows side of a client connection: frames in, actions out, writes.

`Connection` is one socket's listener. Frames pass the RFC 6455 layer
(`FramedListener`), then the sans-I/O `Session`, whose actions go to the
socket's `ConnectionEvents` (the hub, gateway/hub.py), which this module
does not import. Fan-out never goes through here per message: the
room registry holds each live socket's raw `write` and the hub calls it with
the shared, pre-framed buffer.

Lifetime hazard: picows' `WSFrame` is valid only inside `on_ws_frame`; the
layer copies what it keeps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Protocol

from picows import WSFrame, WSMsgType, WSTransport

from gateway.adapters.message_listener import FramedListener
from gateway.core.server_frames import text_frame
from gateway.core.session import Session
from roomcast.wire.codes import CloseCode

if TYPE_CHECKING:
    from gateway.core.session import Action

__all__ = ["Connection", "ConnectionEvents"]

log = logging.getLogger("roomcast.gateway.ws")

_TEXT = WSMsgType.TEXT


class ConnectionEvents(Protocol):
    """What a socket tells the rest of the worker."""

    def connection_opened(self, conn: Connection) -> None: ...

    def connection_closed(self, conn: Connection) -> None:
        """The socket is gone or closing: nothing more may be written to it."""

    def perform(self, conn: Connection, actions: list[Action]) -> None:
        """Carry out what the socket's session decided about a frame."""

    def connection_paused(self, conn: Connection) -> None:
        """The kernel send buffer is full: frames queue in `conn.pending` from now on
        (the events side closes the socket with 4000 when the queue grows too long)."""

    def connection_resumed(self, conn: Connection) -> None: ...


class Connection(FramedListener):
    """One client WebSocket."""

    # No __dict__: an idle socket's memory decides connections per worker.
    __slots__ = ("events", "session", "transport", "raw_write", "closed", "paused", "pending", "pending_bytes", "awaiting_pong")

    def __init__(self, events: ConnectionEvents, session: Session, max_message_bytes: int) -> None:
        super().__init__(max_message_bytes)
        self.events = events
        self.session = session
        self.transport: WSTransport | None = None
        self.raw_write = _discard
        self.closed = False
        self.paused = False
        # Frames held while the transport is paused (bytes objects shared with
        # every other socket of the room: a slow socket holds references, not copies).
        self.pending: list[bytes] | None = None  # made when the socket is first paused
        self.pending_bytes = 0
        self.awaiting_pong = False

    # ---- picows callbacks ----------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        super().on_ws_connected(transport)  # the frame layer's read splitter
        self.transport = transport
        underlying = transport.underlying_transport
        # Pre-framed fan-out bytes go straight to the socket: picows' own sends
        # (joined, ack, error, close) write to the same transport synchronously,
        # so the order of everything a socket receives is kept.
        self.raw_write = underlying.write
        self.events.connection_opened(self)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True
        self.events.connection_closed(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        self.awaiting_pong = False  # any frame from the peer shows it is alive
        FramedListener.on_ws_frame(self, transport, frame)

    def on_text(self, transport: WSTransport, text: str) -> None:
        if not self.closed:  # after our close, only the peer's close answer matters
            self.events.perform(self, self.session.receive_text(_now_ms(), text))

    def on_binary(self, transport: WSTransport, data: bytes) -> None:
        if not self.closed:
            self.events.perform(self, self.session.refuse_binary())

    def pause_writing(self) -> None:
        # The socket's transport buffer passed its high-water mark: from now on
        # this connection's frames queue here, counted against the limit.
        self.paused = True
        self.events.connection_paused(self)

    def resume_writing(self) -> None:
        self.paused = False
        pending, self.pending = self.pending, None
        self.pending_bytes = 0
        if pending and not self.closed:
            self.raw_write(b"".join(pending))
        self.events.connection_resumed(self)

    def ping(self) -> None:
        """Heartbeat: ask for a pong; the next sweep drops the socket if nothing came."""
        if self.transport is not None and not self.closed:
            self.awaiting_pong = True
            self.transport.send_ping()

    def drop(self) -> None:
        """Cut a dead peer's connection at once (no close handshake: it cannot answer)."""
        if self.closed:
            return
        self.closed = True
        self.events.connection_closed(self)
        if self.transport is not None:
            self.transport.underlying_transport.abort()

    def pause_reading(self) -> None:
        """Stop reading client frames (drain): what is sent now waits for the next gateway."""
        if self.transport is not None and not self.closed:
            self.transport.underlying_transport.pause_reading()

    # ---- writes --------------------------------------------------------------

    def send_text(self, payload: bytes) -> None:
        """One control-path frame (joined, ack, error...), in order with fan-out frames."""
        if self.closed or self.transport is None:
            return
        if self.paused:
            self.queue_write(text_frame(payload))
        else:
            self.transport.send(_TEXT, payload)

    def write_frames(self, data: bytes) -> None:
        """Pre-built frames, through the queue while the socket is paused."""
        if self.paused:
            self.queue_write(data)
        elif not self.closed:
            self.raw_write(data)

    def queue_write(self, data: bytes) -> None:
        """The writer of a paused socket: queues, and counts `pending_bytes` (whoever
        writes decides when a queue is too long: a slow consumer)."""
        if self.closed:
            return
        if self.pending is None:
            self.pending = [data]
        else:
            self.pending.append(data)
        self.pending_bytes += len(data)

    def end(self, code: int, reason: str = "", linger_s: float = 0.0) -> None:
        """Leave every room, send a close frame with code, disconnect. Idempotent.

        With linger_s the peer gets that long to answer the close (RFC 6455
        7.1.2) before the TCP connection is cut: a client still sending when
        the server closes at once may lose the close frame to a reset.
        """
        if self.closed:
            return
        self.closed = True
        self.events.connection_closed(self)
        transport = self.transport
        if transport is None:
            return
        if linger_s > 0 and not transport.is_close_frame_sent:
            transport.send_close(code, reason.encode())  # type: ignore[arg-type]
            # Read the peer's close answer (a drain has paused reading), so the
            # connection ends with the handshake, not when the linger runs out.
            transport.underlying_transport.resume_reading()
            asyncio.get_running_loop().call_later(linger_s, transport.disconnect)
        else:
            self.close(transport, code, reason)

    def end_slow(self, abort_after_s: float) -> None:
        """Close as a slow consumer (4000): free the queued frames now, send the
        close behind what the transport already holds, and abort the socket if
        the peer has not read it after abort_after_s."""
        if self.closed:
            return
        self.pending = None
        self.pending_bytes = 0
        transport = self.transport
        self.end(CloseCode.SLOW_CONSUMER, "send buffer over the limit; reconnect with since")
        if transport is not None:
            underlying = transport.underlying_transport
            asyncio.get_running_loop().call_later(abort_after_s, _abort_if_open, underlying)


def _abort_if_open(underlying: asyncio.Transport) -> None:
    if not underlying.is_closing() or underlying.get_write_buffer_size():
        underlying.abort()


def _discard(data: bytes) -> None:
    return None


def _now_ms() -> int:
    return int(time.time() * 1000)
