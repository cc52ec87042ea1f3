"""Client of the chat service's history API (PROTOCOL.md 5), for joins and gap fills.

Events come back as raw JSON (`msgspec.Raw`): they are framed for the client
exactly as the chat service returned them, never re-encoded.

Why a pooled keep-alive client, and why aiohttp: the client used to open a
TCP connection per GET (`Connection: close`), so a reconnect storm after a
pod restart (every client joining with `since`) was a connection storm on
the chat service. `python -m bench.history_client` (PERFORMANCE.md "History
client": chat's own HttpServer in a child process, a 50-message page of
10.6 KB, pool 16, 2,000 GETs per row, uvloop, 2-core VM; two runs):

    client        shape          p50 ms      p99 ms       GET/s          connections
    close         sequential     0.32-0.34   0.62-0.72     2,975-2,982     2,100
    close         200 in flight  6.9-8.0     1,026-1,036   1,892-1,893     2,100
    httpx 0.28    sequential     1.10-1.14   1.8-2.5         852-896           1
    httpx 0.28    200 in flight  279-283     1,460-1,502     498-503          16
    aiohttp 3.14  sequential     0.23-0.32   0.8-0.9       2,890-3,325         1
    aiohttp 3.14  200 in flight  1.2-1.5     152-217       8,963-12,625       16

aiohttp: as fast as the old client alone, 5-7x it under a storm (whose p99
of a second is SYN retries on the full listen backlog), with 16 connections
instead of one per GET; httpx was 3-4x slower alone and 18-25x slower than
aiohttp under a storm (its pool hands connections to 200 waiters slowly).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from urllib.parse import quote, urlparse

import aiohttp
import msgspec

from roomcast.wire.events import decode_event_seq
from roomcast.wire.history import HistoryPage

__all__ = ["HistoryClient", "HistoryUnavailable"]

log = logging.getLogger("roomcast.gateway.history")


class HistoryUnavailable(Exception):
    """The history API could not answer."""


_page_decoder = msgspec.json.Decoder(HistoryPage[msgspec.Raw])


class HistoryClient:
    """GETs history pages over at most `pool_size` keep-alive connections.

    `headers`, when given, is called per request for the headers that
    authenticate it (roomcast.service_auth.gateway_history_headers). Make it in the
    event loop that uses it; `aclose()` at the end.
    """

    def __init__(
        self,
        base_url: str,
        *,
        pool_size: int = 16,
        timeout_s: float = 3.0,
        connect_timeout_s: float = 1.0,
        keepalive_s: float = 15.0,
        headers: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        parsed = urlparse(base_url)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"history_url must be http://host:port/, got {base_url!r}")
        self.base = f"http://{parsed.hostname}:{parsed.port or 80}"
        self.prefix = parsed.path.rstrip("/")
        self.pool_size = pool_size
        # total: a request waiting for a pooled connection counts against it.
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)
        self.keepalive_s = keepalive_s
        self.headers = headers
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        # Made on first use: aiohttp wants its session made inside the running loop.
        connector = aiohttp.TCPConnector(
            limit=self.pool_size,
            limit_per_host=self.pool_size,
            # Under the chat server's idle close (30 s): the client drops an idle
            # connection first, so a request is rarely sent on one being closed.
            keepalive_timeout=self.keepalive_s,
        )
        return aiohttp.ClientSession(
            self.base,
            connector=connector,
            timeout=self.timeout,
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )

    async def page(self, room: str, after: int, limit: int = 500) -> tuple[int, list[tuple[int, bytes]]]:
        """(latest_seq, [(seq, event bytes)...]) of messages with seq > after. Raises HistoryUnavailable."""
        path = f"{self.prefix}/rooms/{quote(room, safe='')}/messages?after={after}&limit={limit}"
        try:
            # A pooled connection the server closes just as a GET goes out on
            # it (its idle close, a chat restart) is not an error here: aiohttp
            # (3.10+) sends an idempotent request once more, on a new connection
            # (tests/integration/test_history_client.py).
            body = await self._get(path)
            page = _page_decoder.decode(body)
            return page.latest_seq, [(decode_event_seq(raw), bytes(raw)) for raw in page.messages]
        except (OSError, asyncio.TimeoutError, aiohttp.ClientError, msgspec.DecodeError, ValueError) as exc:
            raise HistoryUnavailable(f"history of {room} after {after}: {exc!r}") from exc

    async def _get(self, path: str) -> bytes:
        session = self._session
        if session is None or session.closed:
            session = self._session = self._open()
        headers = self.headers() if self.headers is not None else None
        async with session.get(path, headers=headers, allow_redirects=False) as response:
            body = await response.read()
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}: {body[:200]!r}")
            return body

    async def aclose(self) -> None:
        """Close the pooled connections. Idempotent; a later page() opens a new pool."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()
