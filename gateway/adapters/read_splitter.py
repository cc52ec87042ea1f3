"""Cuts a socket read in two where picows would otherwise lose a frame.

Installed between the transport and picows' protocol by
`gateway.adapters.message_listener.FramedListener.on_ws_connected`.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from gateway.core.message_layer import OP_CLOSE, frame_extent

__all__ = ["ReadSplitter"]


class ReadSplitter(asyncio.BufferedProtocol):
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
