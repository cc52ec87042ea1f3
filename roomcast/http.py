"""A small asyncio HTTP/1.1 server for GET endpoints, with no dependency.

For the chat service's history API and the gateway's admin port (metrics,
/healthz, /readyz): read-only endpoints, small requests, keep-alive. It is
not a general web server: request bodies are refused beyond a small cap,
chunked request bodies are refused, and every response carries a
Content-Length (no streaming).

    router = Router()
    router.add("/healthz", lambda req: (200, {"content-type": "text/plain"}, b"ok\\n"))
    router.add("/rooms/{room}/messages", history)      # async handlers work too
    server = HttpServer(router, "127.0.0.1", 0)
    await server.start(); print(server.port); ...; await server.aclose()

A handler gets a `Request` and returns `(status, headers, body)`, or an
awaitable of it. `{name}` in a route matches one non-empty path segment and
arrives percent-decoded in `request.params`. HEAD is answered for every GET
route, without the body. An exception in a handler becomes a logged 500.
"""

from __future__ import annotations

import asyncio
import http
import inspect
import logging
import re
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "ErrorRenderer",
    "Handler",
    "Headers",
    "HttpServer",
    "Request",
    "Response",
    "Router",
    "text_error",
]

log = logging.getLogger("roomcast.http")

Headers = Mapping[str, str] | Iterable[tuple[str, str]]
Response = tuple[int, Headers, bytes]
Handler = Callable[["Request"], Response | Awaitable[Response]]
# Renders the server's own errors (400, 404, 405, 431, 500 ...): (status, message) -> Response.
ErrorRenderer = Callable[[int, str], Response]

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_ROUTE_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed request. `path` is as sent (not percent-decoded); `query` and
    `params` are decoded; header names are lower case (repeats joined by ", ")."""

    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    version: str
    params: dict[str, str] = field(default_factory=dict)
    peer: str = ""


def text_error(status: int, message: str) -> Response:
    """The default rendering of a server error: a short text/plain body."""
    return status, {"content-type": "text/plain; charset=utf-8"}, (message + "\n").encode()


class Router:
    """Maps a path to a handler. Exact paths are a dict lookup; `{name}` routes are tried in order."""

    def __init__(self) -> None:
        self._exact: dict[str, tuple[Handler, frozenset[str]]] = {}
        self._patterns: list[tuple[re.Pattern[str], Handler, frozenset[str]]] = []

    def add(self, route: str, handler: Handler, *, methods: Iterable[str] = ("GET",)) -> None:
        """Serve `route` with `handler`. Raises ValueError for a route not starting with '/'."""
        if not route.startswith("/"):
            raise ValueError(f"route {route!r} must start with '/'")
        allowed = frozenset(m.upper() for m in methods)
        if "GET" in allowed:
            allowed |= {"HEAD"}
        if "{" not in route:
            self._exact[route] = (handler, allowed)
            return
        regex, pos = "^", 0
        for m in _ROUTE_PARAM.finditer(route):
            regex += re.escape(route[pos:m.start()]) + f"(?P<{m.group(1)}>[^/]+)"
            pos = m.end()
        regex += re.escape(route[pos:]) + "$"
        self._patterns.append((re.compile(regex), handler, allowed))

    def resolve(self, path: str) -> tuple[Handler, frozenset[str], dict[str, str]] | None:
        """(handler, allowed methods, decoded params) for a raw path, or None when nothing matches."""
        hit = self._exact.get(path)
        if hit is not None:
            return hit[0], hit[1], {}
        for regex, handler, allowed in self._patterns:
            m = regex.match(path)
            if m is not None:
                return handler, allowed, {k: urllib.parse.unquote(v) for k, v in m.groupdict().items()}
        return None


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True, eq=False)  # eq=False: hashed by identity, kept in a set
class _Connection:
    task: asyncio.Task[None]
    writer: asyncio.StreamWriter
    busy: bool = False


class HttpServer:
    """Serves a Router over HTTP/1.1 with keep-alive.

    `max_header_bytes` caps the request line plus headers (over it: 431 and
    close); `max_body_bytes` caps a request body, which is read and ignored
    (over it: 413 and close); a connection idle for `idle_timeout_s`, or
    whose request head takes longer than that, is closed. `cors_origin`, when
    set, adds Access-Control-Allow-Origin to every response and answers
    OPTIONS preflights. `render_error` formats the server's own errors.
    """

    def __init__(
        self,
        router: Router,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_header_bytes: int = 16 * 1024,
        max_body_bytes: int = 64 * 1024,
        idle_timeout_s: float = 30.0,
        cors_origin: str | None = None,
        render_error: ErrorRenderer = text_error,
        name: str = "http",
    ) -> None:
        self.router = router
        self.host = host
        self._port = port
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self.idle_timeout_s = idle_timeout_s
        self.cors_origin = cors_origin
        self.render_error = render_error
        self.name = name
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._closing = False
        self.connections_accepted = 0  # since start; feeds a connections_total metric

    @property
    def port(self) -> int:
        """The bound port (the real one after start() when 0 was asked for)."""
        return self._port

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Bind and listen. Raises OSError when the address is taken or not available."""
        if self._server is not None:
            return
        if self._closing:
            raise RuntimeError("this HttpServer was closed; make a new one")
        self._server = await asyncio.start_server(
            self._serve, self.host, self._port, limit=self.max_header_bytes, reuse_address=True
        )
        self._port = self._server.sockets[0].getsockname()[1]
        log.info("%s listening on %s:%d", self.name, self.host, self._port)

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Stop listening, close idle connections, let requests in flight finish.

        Requests still running after `timeout_s` are cancelled. Idempotent.
        """
        self._closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            if not conn.busy:
                conn.task.cancel()
        tasks = [c.task for c in self._connections]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    # ---- one connection -------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        conn = _Connection(task, writer)
        self._connections.add(conn)
        self.connections_accepted += 1
        peer = writer.get_extra_info("peername")
        peer_text = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")
        try:
            while not self._closing:
                try:
                    async with asyncio.timeout(self.idle_timeout_s):
                        head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return  # client went away, or idle too long: close quietly
                except asyncio.LimitOverrunError:
                    await self._send(writer, self.render_error(431, "request header too large"), False, False)
                    return
                conn.busy = True
                keep_alive = await self._one_request(reader, writer, head, peer_text)
                conn.busy = False
                if not keep_alive:
                    return
        except asyncio.CancelledError:
            pass  # aclose(): closing is all that is left to do
        except ConnectionError:
            pass
        except Exception:  # never let a connection task die with an unhandled error
            log.exception("%s: connection from %s failed", self.name, peer_text)
        finally:
            self._connections.discard(conn)
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, asyncio.CancelledError):
                pass

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: bytes, peer: str
    ) -> bool:
        """Answer one request; True when the connection stays open."""
        try:
            method, target, version, headers = _parse_head(head)
        except _BadRequest as exc:
            await self._send(writer, self.render_error(exc.status, exc.message), False, False)
            return False
        keep_alive = _wants_keep_alive(version, headers.get("connection", "")) and not self._closing
        is_head = method == "HEAD"
        if "transfer-encoding" in headers:
            await self._send(writer, self.render_error(501, "chunked request bodies are not supported"), False, is_head)
            return False
        length_text = headers.get("content-length", "0")
        if not length_text.isdigit():
            await self._send(writer, self.render_error(400, "bad content-length"), False, is_head)
            return False
        length = int(length_text)
        if length > self.max_body_bytes:
            await self._send(writer, self.render_error(413, "request body too large"), False, is_head)
            return False
        if length:
            try:
                await reader.readexactly(length)  # read and ignore: these are GET endpoints
            except asyncio.IncompleteReadError:
                return False

        path, _, query_text = target.partition("?")
        if not path.startswith("/"):
            await self._send(writer, self.render_error(400, "request target must start with /"), False, is_head)
            return False
        resolved = self.router.resolve(path)
        if resolved is None:
            response = self.render_error(404, "not found")
        else:
            handler, allowed, params = resolved
            if method == "OPTIONS" and self.cors_origin is not None:
                response = (204, _preflight_headers(allowed), b"")
            elif method not in allowed:
                status, hdrs, body = self.render_error(405, f"method {method} not allowed")
                response = (status, [*_header_items(hdrs), ("allow", ", ".join(sorted(allowed)))], body)
            else:
                query = dict(urllib.parse.parse_qsl(query_text, keep_blank_values=True))
                request = Request(method, target, path, query, headers, version, params, peer)
                try:
                    result = handler(request)
                    if inspect.isawaitable(result):
                        result = await result
                    response = result
                except Exception:
                    log.exception("%s: handler for %s %s failed", self.name, method, path)
                    response = self.render_error(500, "internal error")
        keep_alive = keep_alive and not self._closing  # aclose() may have begun meanwhile
        await self._send(writer, response, keep_alive, is_head, version == "HTTP/1.0")
        return keep_alive

    async def _send(
        self, writer: asyncio.StreamWriter, response: Response, keep_alive: bool, is_head: bool, http10: bool = False
    ) -> None:
        status, headers, body = response
        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        lines = [f"HTTP/1.1 {status} {reason}"]
        for name, value in _header_items(headers):
            if name.lower() not in ("content-length", "connection"):
                lines.append(f"{name}: {value}")
        if self.cors_origin is not None:
            lines.append(f"access-control-allow-origin: {self.cors_origin}")
        if status != 204 and status != 304:  # RFC 9110 8.6: no Content-Length on these
            lines.append(f"content-length: {len(body)}")
        if not keep_alive:
            lines.append("connection: close")
        elif http10:
            lines.append("connection: keep-alive")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        writer.write(data if is_head else data + body)
        await writer.drain()


def _header_items(headers: Headers) -> Iterable[tuple[str, str]]:
    return headers.items() if isinstance(headers, Mapping) else headers


def _preflight_headers(allowed: frozenset[str]) -> list[tuple[str, str]]:
    return [
        ("access-control-allow-methods", ", ".join(sorted(allowed))),
        ("access-control-allow-headers", "authorization"),
        ("access-control-max-age", "600"),
    ]


def _wants_keep_alive(version: str, connection: str) -> bool:
    tokens = {t.strip().lower() for t in connection.split(",")}
    if version == "HTTP/1.1":
        return "close" not in tokens
    return "keep-alive" in tokens


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    """(method, target, version, headers) of a request head ending in CRLF CRLF.

    Raises _BadRequest (400, or 505 for an HTTP version other than 1.0/1.1).
    """
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1]:
        raise _BadRequest(400, "malformed request line")
    method, target, version = (p.decode("latin-1") for p in parts)
    if not version.startswith("HTTP/"):
        raise _BadRequest(400, "malformed request line")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _BadRequest(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    if any(c < 0x21 or c == 0x7F for c in parts[1]):
        raise _BadRequest(400, "malformed request target")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):  # also refuses obsolete line folding
            raise _BadRequest(400, "malformed header line")
        key = name.decode("latin-1").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key == "content-length" and headers[key] != text:
                raise _BadRequest(400, "conflicting content-length headers")
            headers[key] = headers[key] + ", " + text if key != "content-length" else text
        else:
            headers[key] = text
    return method, target, version, headers
