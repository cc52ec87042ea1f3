"""Client of the chat service's history API (PROTOCOL.md 5), for joins.

Events come back as raw JSON (`msgspec.Raw`): they are framed for the client
exactly as the chat service returned them, never re-encoded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from urllib.parse import quote, urlparse

import msgspec

from roomcast.wire.events import decode_event_seq

__all__ = ["HistoryClient", "HistoryPage", "HistoryUnavailable"]

log = logging.getLogger("roomcast.gateway.history")


class HistoryUnavailable(Exception):
    """The history API could not answer."""


class HistoryPage(msgspec.Struct):
    room: str
    latest_seq: int
    messages: list[msgspec.Raw]


_page_decoder = msgspec.json.Decoder(HistoryPage)


class HistoryClient:
    def __init__(self, base_url: str, *, timeout_s: float = 3.0, token: Callable[[], str] | None = None) -> None:
        parsed = urlparse(base_url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"history_url must be http://host:port/, got {base_url!r}")
        self.host = parsed.hostname
        self.port = parsed.port or 80
        self.prefix = parsed.path.rstrip("/")
        self.timeout_s = timeout_s
        self.token = token

    async def page(self, room: str, after: int, limit: int = 500) -> tuple[int, list[tuple[int, bytes]]]:
        """(latest_seq, [(seq, event bytes)...]) of messages with seq > after. Raises HistoryUnavailable."""
        path = f"{self.prefix}/rooms/{quote(room, safe='')}/messages?after={after}&limit={limit}"
        try:
            body = await asyncio.wait_for(self._get(path), self.timeout_s)
            page = _page_decoder.decode(body)
            return page.latest_seq, [(decode_event_seq(raw), bytes(raw)) for raw in page.messages]
        except (OSError, EOFError, asyncio.TimeoutError, msgspec.DecodeError, ValueError) as exc:
            raise HistoryUnavailable(f"history of {room} after {after}: {exc!r}") from exc

    async def _get(self, path: str) -> bytes:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            auth = f"Authorization: Bearer {self.token()}\r\n" if self.token else ""
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{auth}Connection: close\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            length = None
            for line in header_lines:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            body = await (reader.readexactly(length) if length is not None else reader.read())
            if status != 200:
                raise ValueError(f"HTTP {status}: {body[:200]!r}")
            return body
        finally:
            writer.close()
