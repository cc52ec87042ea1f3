"""picows adapter for the WebSocket message layer (``gateway.core.message_layer``).

picows parses frame headers, unmasks payloads and hands every raw frame to
``WSListener.on_ws_frame``. :class:`FramedListener` feeds those frames to a
:class:`~gateway.core.message_layer.MessageAssembler` and turns its outcomes into
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
delivered (:class:`ReadSplitter`, installed by ``on_ws_connected``).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Final

import picows

from gateway.adapters.read_splitter import ReadSplitter
from gateway.core.message_layer import (
    BinaryMessage,
    Fail,
    MessageAssembler,
    PeerClose,
    SendPong,
    TextMessage,
)
from roomcast.wire.codes import CloseCode

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "FramedListener",
    "EchoListener",
    "make_server_kwargs",
]

# PROTOCOL.md section 3: 1009 for a frame over the size limit, 64 KiB by
# default. Autobahn sections 1-7 and 10 send messages of up to 65536 bytes.
DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024


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
    base method first (``on_ws_connected`` installs :class:`ReadSplitter`;
    set ``split_reads = False`` on the subclass to do without it). The read
    splitter is tested on asyncio's and uvloop's transports only, not on
    aiofastnet's (which picows uses when it is installed).
    """

    #: Cut socket reads before a frame picows refuses and after a close
    #: frame, so the frames before it are still delivered and answered (see
    #: :class:`ReadSplitter`; costs a walk over each read's frame headers).
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
                underlying.set_protocol(ReadSplitter(underlying.get_protocol()))
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
        self.close(transport, CloseCode.BINARY_FRAME, "binary frames are not accepted; send text")

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
            self._close(transport, CloseCode.INTERNAL_ERROR, "internal error", by_peer=False)

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
