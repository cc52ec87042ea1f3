"""picows adapter for the WebSocket message layer (``gateway.core.framing``).

picows parses frame headers, unmasks payloads and hands every raw frame to
``WSListener.on_ws_frame``. :class:`FramedListener` feeds those frames to a
:class:`~gateway.core.framing.MessageAssembler` and turns its outcomes into
calls and sends, so a subclass sees only whole, valid messages:

    class RoomListener(FramedListener):
        def on_text(self, transport, text): ...       # required
        def on_binary(self, transport, data): ...     # optional: default closes 1003
        def on_closing(self, transport, code, reason, by_peer): ...  # optional

Start the server with :func:`make_server_kwargs` so picows and the layer do
not both act on the same frame::

    await picows.ws_create_server(factory, host, port, **make_server_kwargs(limit))

What picows 2.3 does by itself (``picows.pyx``), while parsing, before a
frame reaches ``on_ws_frame``; it then sends its close, logs at ERROR and
disconnects 10 ms later without telling the listener:

- 1002 for reserved opcodes, fragmented control frames, control payloads
  over 125 bytes, unmasked client frames, non-minimal length encodings;
- 1002 for a close frame with a 1-byte body, a code below 3000 missing from
  its ``WSCloseCode`` enum (which lets 0 and 1006 through) or a second
  close; 1007 for a close reason that is not UTF-8;
- 1009 for a data frame over ``max_frame_size``, judged on the header,
  before the payload is buffered.

It does not check RSV bits, fragmentation, text UTF-8, close codes 0, 1006
and 5000 and above, nor message size across fragments: the layer does. The
layer repeats picows' checks too, since it is sans-I/O and tested alone.
Two picows behaviours are switched off or worked around: its automatic pong
(:func:`make_server_kwargs`), and its parse-ahead, which lets a refused
frame close the connection before the valid frame in front of it is
delivered (:class:`_ReadSplitter`, installed by ``on_ws_connected``).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, ClassVar, Final

import picows

from gateway.core.framing import (
    OP_CLOSE,
    BinaryMessage,
    Fail,
    MessageAssembler,
    PeerClose,
    SendPong,
    TextMessage,
    frame_extent,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "CLOSE_UNSUPPORTED_DATA",
    "CLOSE_INTERNAL_ERROR",
    "FramedListener",
    "EchoListener",
    "make_server_kwargs",
]

# PROTOCOL.md section 3: 1009 for a frame over the size limit, 64 KiB by
# default. Autobahn sections 1-7 and 10 send messages of up to 65536 bytes.
DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024

# RFC 6455 7.4.1.
CLOSE_UNSUPPORTED_DATA: Final = 1003
CLOSE_INTERNAL_ERROR: Final = 1011

_logger = logging.getLogger("roomcast.gateway.ws")


def make_server_kwargs(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """Keyword arguments for ``picows.ws_create_server`` serving FramedListeners.

    - ``enable_auto_pong=False``: picows would answer every ping itself,
      before the layer sees it, so a ping with RSV bits set would get a pong
      instead of a 1002. The layer answers pings.
    - ``max_frame_size``: twice the layer's limit (plus one, so a limit of 0
      still works), so a frame just over the limit reaches the layer, which
      closes with 1009 through ``on_closing`` like any other failure. picows
      stays the backstop for larger frames: it refuses them with 1009 from
      the header alone, so no connection can make the server buffer more
      than this per frame.
    - ``disconnect_on_exception=True`` (picows' default, stated): nothing
      escapes ``FramedListener.on_ws_frame``, but if picows' own callbacks
      raise it must close rather than leave a half-dead socket.

    The listener passed to ``ws_create_server`` must use the same
    ``max_message_bytes``.
    """
    if max_message_bytes < 0:
        raise ValueError(f"max_message_bytes must be >= 0, got {max_message_bytes}")
    return {
        "enable_auto_pong": False,
        "max_frame_size": 2 * max_message_bytes + 1,
        "disconnect_on_exception": True,
    }


class FramedListener(picows.WSListener):
    """A picows listener that delivers whole, valid messages to subclasses.

    Subclass contract (all called on the event loop, inside picows'
    ``on_ws_frame``; keep them synchronous and make a task only for a real
    await):

    - :meth:`on_text` ``(transport, text)``: a complete text message, valid
      UTF-8, at most ``max_message_bytes`` UTF-8 bytes. Must be overridden.
    - :meth:`on_binary` ``(transport, data)``: a complete binary message.
      Default: close with 1003 (PROTOCOL.md: binary frames are refused).
    - :meth:`on_closing` ``(transport, code, reason, by_peer)``: the layer has
      just sent a close frame and is about to disconnect. Default: nothing.
      For logs and metrics; release resources in ``on_ws_disconnected``,
      which picows calls for every connection however it ends.
    - :meth:`close` ``(transport, code, reason)``: call to close the
      connection yourself (1003, 1008, 1012, 4000, ...).

    An exception from any of these is logged on ``roomcast.gateway.ws`` with
    its traceback and the connection is closed with 1011: nothing escapes
    ``on_ws_frame``. A subclass that wants the socket to live on after a bad
    message (PROTOCOL.md: error frames) catches its own exceptions.

    Subclasses that define ``__init__`` or ``on_ws_connected`` call the
    base method first (``on_ws_connected`` installs :class:`_ReadSplitter`;
    set ``split_reads = False`` on the subclass to do without it). The read
    splitter is tested on asyncio's and uvloop's transports only, not on
    aiofastnet's (which picows uses when it is installed).
    """

    #: Cut socket reads before a frame picows refuses and after a close
    #: frame, so the frames before it are still delivered and answered (see
    #: :class:`_ReadSplitter`; costs a walk over each read's frame headers).
    split_reads: ClassVar[bool] = True

    __slots__ = ("assembler",)

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        super().__init__()
        self.assembler = MessageAssembler(max_message_bytes)

    def on_ws_connected(self, transport: picows.WSTransport) -> None:
        """picows callback after the upgrade. A subclass that overrides it
        calls ``super().on_ws_connected(transport)`` first."""
        if self.split_reads:
            underlying = transport.underlying_transport
            try:
                underlying.set_protocol(_ReadSplitter(underlying.get_protocol()))
            except Exception:
                # A transport without set_protocol: serve unsplit rather
                # than refuse the connection.
                _logger.warning("cannot split reads; serving unsplit", exc_info=True)

    # -- subclass hooks ---------------------------------------------------

    def on_text(self, transport: picows.WSTransport, text: str) -> None:
        """Called with each complete text message. Override this."""
        raise NotImplementedError(f"{type(self).__name__} must override on_text")

    def on_binary(self, transport: picows.WSTransport, data: bytes) -> None:
        """Called with each complete binary message. Default: close 1003."""
        self.close(transport, CLOSE_UNSUPPORTED_DATA, "binary frames are not accepted; send text")

    def on_closing(self, transport: picows.WSTransport, code: int, reason: str, by_peer: bool) -> None:
        """Called once when the layer sends its close frame, before it
        disconnects. ``by_peer`` is True when this echoes the peer's close,
        False for a protocol failure (1002/1007/1009), an internal error
        (1011) or :meth:`close`. Default: nothing."""

    # -- actions ----------------------------------------------------------

    def close(self, transport: picows.WSTransport, code: int, reason: str = "") -> None:
        """Send a close frame with ``code`` and ``reason``, then disconnect.

        Frames that arrive afterwards are ignored. Safe to call more than
        once: only the first call sends. ``reason`` is cut to 123 UTF-8
        bytes (RFC 6455 5.5). To close and let the peer answer first (a
        drain), call ``transport.send_close(code)`` instead: when the
        peer's close arrives the layer disconnects.
        """
        self._close(transport, code, reason, by_peer=False)

    # -- picows callback --------------------------------------------------

    def on_ws_frame(self, transport: picows.WSTransport, frame: picows.WSFrame) -> None:
        # The frame is only valid inside this call (picows reuses its
        # buffer): get_payload_as_bytes copies the payload out.
        try:
            # msg_type is an IntEnum at run time (picows' stub says Enum).
            outcome = self.assembler.feed(
                int(frame.msg_type),  # type: ignore[call-overload]
                frame.fin,
                frame.rsv1,
                frame.rsv2,
                frame.rsv3,
                frame.get_payload_as_bytes(),
            )
            if outcome is None:
                return
            if isinstance(outcome, TextMessage):
                self.on_text(transport, outcome.text)
            elif isinstance(outcome, SendPong):
                transport.send_pong(outcome.payload)
            elif isinstance(outcome, BinaryMessage):
                self.on_binary(transport, outcome.data)
            elif isinstance(outcome, Fail):
                _logger.debug("protocol failure, closing with %d: %s", outcome.code, outcome.reason)
                self._close(transport, outcome.code, outcome.reason, by_peer=False)
            elif isinstance(outcome, PeerClose):
                # RFC 6455 5.5.1: answer a close with a close, then (7.1.1)
                # the server closes the TCP connection first.
                self._close(transport, outcome.code, outcome.reason, by_peer=True)
        except Exception:
            # picows would log and close 1011 itself; do it here so the
            # log names this layer and later frames are ignored.
            _logger.exception("unhandled error in frame handler, closing with 1011")
            self._close(transport, CLOSE_INTERNAL_ERROR, "internal error", by_peer=False)

    # -- internals --------------------------------------------------------

    def _close(self, transport: picows.WSTransport, code: int, reason: str, by_peer: bool) -> None:
        # Never raises: it runs in on_ws_frame's except clause too.
        self.assembler.close()
        try:
            # A close already sent means this is the peer's answer to ours
            # (or picows failed the connection itself): only disconnect.
            if not transport.is_close_frame_sent:
                transport.send_close(picows.WSCloseCode(code), _close_reason_bytes(reason))
                self.on_closing(transport, code, reason, by_peer)
        except Exception:
            _logger.exception("error while closing with %d", code)
        finally:
            # Graceful: the transport flushes the close frame, then closes
            # the socket; the server closes TCP first (RFC 6455 7.1.1).
            transport.disconnect()


def _close_reason_bytes(reason: str) -> bytes:
    # RFC 6455 5.5: a close payload is at most 125 bytes, 2 of them the code.
    data = reason.encode()
    if len(data) > 123:
        data = data[:123].decode(errors="ignore").encode()
    return data


class _ReadSplitter(asyncio.BufferedProtocol):
    """Sits between the socket transport and picows' protocol and cuts a
    read in two where picows would otherwise lose a frame.

    Why: picows parses the next frame of a read before it delivers the
    current one, and fails the connection as soon as a parse fails. So when
    a valid frame is followed, in the same read, by one picows refuses (a
    reserved opcode, a fragmented or oversized control frame, a second
    close), picows sends its own close first and the valid frame reaches the
    listener too late: the echo of a message, or the answer to the peer's
    close (RFC 6455 5.5.1), is never sent. Autobahn 7.1.2 (two close frames)
    fails; 4.1.3-4.2.5 (a message, then a reserved opcode) are non-strict.

    The splitter walks the frame headers of each read and hands picows the
    bytes up to such a frame, then the rest; after a close frame it stops
    walking (everything the peer sends after its close is ignored anyway).
    A read that is all payload of a frame already walked costs one
    comparison. Nothing is dropped or reordered: were the walk ever
    misaligned (a client that sent frames before the 101, against RFC 6455
    4.1), a read would only be cut at a harmless place, and picows handles
    partial reads by design.
    """

    __slots__ = (
        "_get_buffer",
        "_buffer_updated",
        "_skip",
        "_head",
        "_close_pending",
        "get_buffer",
        "connection_lost",
        "eof_received",
        "pause_writing",
        "resume_writing",
    )

    def __init__(self, inner: Any) -> None:
        # The loop calls these on picows' protocol directly: no extra Python
        # call per read for them (slots shadow BufferedProtocol's methods).
        self.get_buffer = self._get_buffer = inner.get_buffer  # type: ignore[method-assign]
        self.connection_lost = inner.connection_lost  # type: ignore[method-assign]
        self.eof_received = inner.eof_received  # type: ignore[method-assign]
        self.pause_writing = inner.pause_writing  # type: ignore[method-assign]
        self.resume_writing = inner.resume_writing  # type: ignore[method-assign]
        self._buffer_updated = inner.buffer_updated
        # Bytes of the current frame still to come; sys.maxsize once the
        # walk has stopped.
        self._skip = 0
        # The start of a frame header cut by the end of the previous read.
        self._head = b""
        # True while the rest of a close frame is still to come.
        self._close_pending = False

    def buffer_updated(self, nbytes: int) -> None:
        skip = self._skip
        if skip >= nbytes:
            self._skip = skip - nbytes
            self._buffer_updated(nbytes)
            return
        if self._close_pending:
            self._stop(self._get_buffer(-1), skip, nbytes)
            return
        if self._head:
            self._resume_header(nbytes)
            return
        # The memory the loop just wrote into: picows moves its write
        # position only in buffer_updated, so get_buffer returns it again.
        view = self._get_buffer(-1)
        pos = skip
        # Inlined walk over data frames (RFC 6455 5.2 header layout); any
        # other opcode goes to _walk, which knows picows' refusals.
        while pos < nbytes - 3:
            if view[pos] & 0x0F > 0x2:
                break
            second = view[pos + 1]
            length = second & 0x7F
            if length < 126:
                pos += length + (6 if second & 0x80 else 2)
            elif length == 126:
                pos += ((view[pos + 2] << 8) | view[pos + 3]) + (8 if second & 0x80 else 4)
            else:
                break
        if pos < nbytes:
            self._walk(view, pos, nbytes)
            return
        self._skip = pos - nbytes
        self._buffer_updated(nbytes)

    def _walk(self, view: memoryview, pos: int, nbytes: int) -> None:
        # The general walk, from a frame header at view[pos].
        while pos < nbytes:
            extent = frame_extent(view, pos, nbytes)
            if extent is None:
                self._head = view[pos:nbytes].tobytes()
                self._skip = 0
                self._buffer_updated(nbytes)
                return
            if extent < 0:
                # Deliver what precedes the refused frame before picows
                # parses it.
                self._stop(view, pos, nbytes)
                return
            opcode = view[pos] & 0x0F
            pos += extent
            if opcode == OP_CLOSE:
                self._stop(view, pos, nbytes)
                return
        self._skip = pos - nbytes
        self._buffer_updated(nbytes)

    def _resume_header(self, nbytes: int) -> None:
        # The previous read ended inside a frame header (at most 14 bytes):
        # parse it from its saved start and this read's first bytes.
        view = self._get_buffer(-1)
        head = self._head
        buf = head + view[: min(nbytes, 14)].tobytes()
        extent = frame_extent(buf, 0, len(buf))
        if extent is None:
            self._head = buf
            self._buffer_updated(nbytes)
            return
        self._head = b""
        if extent < 0:
            # picows refuses this frame and nothing precedes it in this
            # read: nothing to cut.
            self._stop(view, 0, nbytes)
            return
        pos = extent - len(head)
        if buf[0] & 0x0F == OP_CLOSE:
            self._stop(view, pos, nbytes)
        elif pos >= nbytes:
            self._skip = pos - nbytes
            self._buffer_updated(nbytes)
        else:
            self._walk(view, pos, nbytes)

    def _stop(self, view: memoryview, pos: int, nbytes: int) -> None:
        # Hand picows view[:pos], then the rest, and stop walking. A close
        # frame may end after this read: cut where it ends, in a later one.
        if pos > nbytes:
            self._skip = pos - nbytes
            self._close_pending = True
            self._buffer_updated(nbytes)
            return
        self._skip = sys.maxsize
        self._close_pending = False
        if pos <= 0 or pos == nbytes:
            self._buffer_updated(nbytes)
            return
        rest = view[pos:nbytes].tobytes()
        self._buffer_updated(pos)
        # picows has consumed the first part; copy the rest to where it now
        # expects new data, as the loop would have.
        while rest:
            free = self._get_buffer(-1)
            count = min(len(free), len(rest))
            free[:count] = rest[:count]
            rest = rest[count:]
            self._buffer_updated(count)


class EchoListener(FramedListener):
    """Echoes every text and binary message: Autobahn's test target.

    The gateway serves it at ``/echo`` behind a test flag; the Autobahn
    integration test starts it directly.
    """

    __slots__ = ()

    def on_text(self, transport: picows.WSTransport, text: str) -> None:
        transport.send(picows.WSMsgType.TEXT, text.encode())

    def on_binary(self, transport: picows.WSTransport, data: bytes) -> None:
        transport.send(picows.WSMsgType.BINARY, data)
