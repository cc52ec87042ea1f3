"""Server-to-client WebSocket frames built once and shared by every socket.

Server frames are never masked (RFC 6455 5.1), so the bytes of a frame depend
only on its payload: a broadcast is framed once and the same buffer is written
to every socket of a room, and several frames can be concatenated into one
buffer that a socket receives with a single write.
"""

from __future__ import annotations

import struct

__all__ = ["text_frame", "text_frame_header"]

_pack_16 = struct.Struct("!BBH").pack
_pack_64 = struct.Struct("!BBQ").pack

_FIN_TEXT = 0x81  # FIN bit + opcode 0x1 (RFC 6455 5.2)


def text_frame_header(payload_len: int) -> bytes:
    """The header of an unmasked, final text frame of payload_len bytes."""
    if payload_len < 126:
        return bytes((_FIN_TEXT, payload_len))
    if payload_len < 65536:
        return _pack_16(_FIN_TEXT, 126, payload_len)
    return _pack_64(_FIN_TEXT, 127, payload_len)


def text_frame(payload: bytes) -> bytes:
    """A complete unmasked final text frame carrying payload."""
    return text_frame_header(len(payload)) + payload
