"""The subscriber connection's RESP reader, sans-I/O: bytes in, push messages out.

:class:`PushReader` feeds hiredis the bytes of one socket read and sorts the
replies into what the subscriber acts on: messages grouped by channel (in
arrival order), SUBSCRIBE confirmations, pongs and error replies. It owns no
socket and no event loop, so it is tested and fuzzed without Redis
(``tests/fuzz/resp_reader.py``). It lives among the adapters, not in
``gateway.core``, only because it drives the hiredis C parser.

hiredis raises ``hiredis.ProtocolError`` on bytes that are not RESP.
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


class PushReader:
    """One connection's RESP stream. Call :meth:`read` with each read's bytes, in order."""

    __slots__ = ("_reader", "_feed_bytes")

    def __init__(self, feed_bytes: int = FEED_BYTES) -> None:
        if feed_bytes < 1:
            raise ValueError(f"feed_bytes must be >= 1, got {feed_bytes}")
        self._reader = hiredis.Reader()
        self._feed_bytes = feed_bytes

    def read(self, buffer: bytes | bytearray, nbytes: int) -> PushRead:
        """Parse ``buffer[:nbytes]`` (a reply may span reads)."""
        result = PushRead()
        reader = self._reader
        messages = result.messages
        feed_bytes = self._feed_bytes
        for offset in range(0, nbytes, feed_bytes):
            reader.feed(buffer, offset, min(feed_bytes, nbytes - offset))
            while True:
                reply = reader.gets()
                if reply is False:
                    break
                if type(reply) is list:
                    kind = reply[0]
                    if kind == b"message" or kind == b"smessage":
                        channel = reply[1]
                        queue = messages.get(channel)
                        if queue is None:
                            messages[channel] = [reply[2]]
                        else:
                            queue.append(reply[2])
                        continue
                    if kind == b"subscribe" or kind == b"ssubscribe":
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
