"""The subscriber connection's RESP reader, sans-I/O: bytes in, push messages out.

:class:`PushReader` feeds hiredis the bytes of one socket read and sorts the
replies into what the subscriber acts on: messages grouped by channel (in
arrival order), SUBSCRIBE confirmations, pongs and error replies. It owns no
socket and no event loop, so it is tested and fuzzed without Redis
(``tests/fuzz/resp_reader.py``). It lives among the adapters, not in
``gateway.core``, only because it drives the hiredis C parser.

Whatever the bytes, :meth:`PushReader.read` raises nothing: a reply of the
wrong shape is counted in ``PushRead.malformed`` and skipped, and a stream
that hiredis cannot parse ends the read with ``PushRead.protocol_error`` set
(the replies before it are still returned; the caller drops the connection,
as hiredis cannot resynchronise).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import hiredis

__all__ = ["PushReader", "PushRead", "MessageBatch", "FEED_BYTES"]

MessageBatch = dict[bytes, list[bytes]]

# hiredis compacts its buffer after every reply it returns, so feeding it a
# whole big read costs O(read size) per reply; slices of FEED_BYTES keep
# that cost small. The batch still spans the read.
FEED_BYTES = 16 * 1024


@dataclass(slots=True)
class PushRead:
    """What one read held, in the order each kind arrived."""

    messages: MessageBatch = field(default_factory=dict)
    # Channels whose (S)SUBSCRIBE Redis confirmed, one entry per confirmation.
    confirmed: list[bytes] = field(default_factory=list)
    pongs: int = 0
    # Error replies to the subscriber's commands (e.g. "MOVED 1234 host:port").
    errors: list[str] = field(default_factory=list)
    # Replies of an unexpected shape (a message without a payload, a
    # channel that is not a string, ...): skipped, not delivered.
    malformed: int = 0
    # Set when the bytes stopped being RESP; nothing after it was read.
    protocol_error: str | None = None


class PushReader:
    """One connection's RESP stream. Call :meth:`read` with each read's bytes, in order."""

    __slots__ = ("_reader", "_feed_bytes", "_failed")

    def __init__(self, feed_bytes: int = FEED_BYTES) -> None:
        if feed_bytes < 1:
            raise ValueError(f"feed_bytes must be >= 1, got {feed_bytes}")
        self._reader = hiredis.Reader()
        self._feed_bytes = feed_bytes
        self._failed: str | None = None

    def read(self, buffer: bytes | bytearray, nbytes: int) -> PushRead:
        """Parse ``buffer[:nbytes]`` (a reply may span reads). Never raises."""
        result = PushRead()
        if self._failed is not None:
            # hiredis keeps failing on the same bytes: read nothing more.
            result.protocol_error = self._failed
            return result
        reader = self._reader
        messages = result.messages
        feed_bytes = self._feed_bytes
        for offset in range(0, nbytes, feed_bytes):
            reader.feed(buffer, offset, min(feed_bytes, nbytes - offset))
            while True:
                try:
                    reply = reader.gets()
                except Exception as exc:
                    # ProtocolError for bytes that are not RESP; TypeError for
                    # a RESP3 map keyed by an array (hiredis builds a dict).
                    # Either way the parser's state is unknown: stop here.
                    self._failed = result.protocol_error = f"{type(exc).__name__}: {exc}"
                    return result
                if reply is False:
                    break
                if type(reply) is list:
                    size = len(reply)
                    kind = reply[0] if size else None
                    if kind == b"message" or kind == b"smessage":
                        channel = reply[1] if size == 3 else None
                        payload = reply[2] if size == 3 else None
                        if type(channel) is not bytes or type(payload) is not bytes:
                            result.malformed += 1
                            continue
                        queue = messages.get(channel)
                        if queue is None:
                            messages[channel] = [payload]
                        else:
                            queue.append(payload)
                        continue
                    if kind == b"subscribe" or kind == b"ssubscribe":
                        if size < 2 or type(reply[1]) is not bytes:
                            result.malformed += 1
                            continue
                        result.confirmed.append(reply[1])
                        continue
                    if kind == b"pong":
                        result.pongs += 1
                        continue
                    # unsubscribe confirmations need no action
                elif isinstance(reply, hiredis.ReplyError):
                    result.errors.append(str(reply))
                elif reply == b"PONG":  # PING outside subscribed mode (no channel yet)
                    result.pongs += 1
        return result
