"""roomcast.http: the small GET server, over real loopback sockets."""

from __future__ import annotations

import asyncio
import http.client
from collections.abc import AsyncIterator

import pytest

from roomcast.http import HttpServer, Request, Response, Router


class Client:
    """A raw HTTP/1.1 connection: send bytes, read whole responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, raw: bytes) -> None:
        self.writer.write(raw)
        await self.writer.drain()

    async def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                assert k.lower() not in headers, f"repeated header {k}"
                headers[k.lower()] = v.strip()
        n = 0 if head_only else int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(n), 5) if n else b""
        return status, headers, body

    async def get(self, path: str, extra: str = "") -> tuple[int, dict[str, str], bytes]:
        await self.send(f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode())
        return await self.response()

    async def closed_by_server(self) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(1), 5) == b""
        except ConnectionError:
            return True

    async def aclose(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


def text(body: str, status: int = 200) -> Response:
    return status, {"content-type": "text/plain"}, body.encode()


@pytest.fixture
async def gate() -> asyncio.Event:
    return asyncio.Event()


@pytest.fixture
async def server(gate: asyncio.Event) -> AsyncIterator[HttpServer]:
    router = Router()
    router.add("/hello", lambda req: text("hello"))

    async def echo(req: Request) -> Response:
        return text(f"{req.method} {req.params} {sorted(req.query.items())} {req.headers.get('x-a', '')}")

    async def slow(req: Request) -> Response:
        await gate.wait()
        return text("slow done")

    def boom(req: Request) -> Response:
        raise RuntimeError("boom")

    router.add("/items/{room}/x/{n}", echo)
    router.add("/slow", slow)
    router.add("/boom", boom)
    s = HttpServer(router, "127.0.0.1", 0, max_header_bytes=2048, max_body_bytes=100, idle_timeout_s=1.0)
    await s.start()
    try:
        yield s
    finally:
        gate.set()
        await s.aclose()


@pytest.fixture
async def client(server: HttpServer) -> AsyncIterator[Client]:
    c = await Client.connect(server.port)
    try:
        yield c
    finally:
        await c.aclose()


async def test_start_binds_a_free_port_when_asked_for_0(server: HttpServer) -> None:
    assert server.port > 0


async def test_get_answers_with_status_headers_and_content_length(client: Client) -> None:
    status, headers, body = await client.get("/hello")
    assert (status, body) == (200, b"hello")
    assert headers["content-length"] == "5"
    assert headers["content-type"] == "text/plain"


async def test_keep_alive_serves_many_requests_on_one_connection(client: Client) -> None:
    for _ in range(5):
        assert (await client.get("/hello"))[2] == b"hello"


async def test_pipelined_requests_are_answered_in_order(client: Client) -> None:
    await client.send(b"GET /hello HTTP/1.1\r\nHost: t\r\n\r\nGET /items/a/x/1 HTTP/1.1\r\nHost: t\r\n\r\n")
    assert (await client.response())[2] == b"hello"
    assert (await client.response())[2].startswith(b"GET {'room': 'a', 'n': '1'}")


async def test_connection_close_is_honoured(client: Client) -> None:
    status, headers, _ = await client.get("/hello", "Connection: close\r\n")
    assert status == 200 and headers["connection"] == "close"
    assert await client.closed_by_server()


async def test_http10_closes_unless_keep_alive_is_asked(server: HttpServer) -> None:
    c = await Client.connect(server.port)
    await c.send(b"GET /hello HTTP/1.0\r\n\r\n")
    assert (await c.response())[0] == 200
    assert await c.closed_by_server()
    await c.aclose()
    c = await Client.connect(server.port)
    await c.send(b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    status, headers, _ = await c.response()
    assert status == 200 and headers["connection"] == "keep-alive"
    await c.send(b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert (await c.response())[2] == b"hello"
    await c.aclose()


async def test_route_params_are_percent_decoded_and_query_parsed(client: Client) -> None:
    status, _, body = await client.get("/items/a%3Ab/x/7?limit=5&after=&q=a+b", "X-A: one\r\n")
    assert status == 200
    assert body == b"GET {'room': 'a:b', 'n': '7'} [('after', ''), ('limit', '5'), ('q', 'a b')] one"


async def test_a_param_does_not_match_across_slashes_or_empty(client: Client) -> None:
    assert (await client.get("/items/a/b/x/7"))[0] == 404
    assert (await client.get("/items//x/7"))[0] == 404


async def test_unknown_path_is_404_and_the_connection_lives(client: Client) -> None:
    assert (await client.get("/nope"))[0] == 404
    assert (await client.get("/hello"))[0] == 200


async def test_wrong_method_is_405_with_allow(client: Client) -> None:
    await client.send(b"POST /hello HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
    status, headers, _ = await client.response()
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert (await client.get("/hello"))[0] == 200  # the body was consumed, the connection is in sync


async def test_head_gives_the_headers_of_get_without_the_body(client: Client) -> None:
    await client.send(b"HEAD /hello HTTP/1.1\r\nHost: t\r\n\r\n")
    status, headers, _ = await client.response(head_only=True)
    assert status == 200 and headers["content-length"] == "5"
    assert (await client.get("/hello"))[2] == b"hello"  # nothing stray was sent after the head


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /hello\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nHost: t\r\n folded: header\r\n\r\n",
        b"GET hello HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET /hel lo HTTP/1.1\r\n\r\n",
    ],
)
async def test_malformed_requests_get_400_and_close(client: Client, raw: bytes) -> None:
    await client.send(raw)
    assert (await client.response())[0] == 400
    assert await client.closed_by_server()


async def test_unsupported_http_version_is_505(client: Client) -> None:
    await client.send(b"GET /hello HTTP/2.0\r\n\r\n")
    assert (await client.response())[0] == 505


async def test_header_over_the_cap_is_431_and_close(client: Client) -> None:
    await client.send(b"GET /hello HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 4000 + b"\r\n\r\n")
    status, headers, _ = await client.response()
    assert status == 431 and headers["connection"] == "close"
    assert await client.closed_by_server()


async def test_body_over_the_cap_is_413_and_chunked_is_501(server: HttpServer) -> None:
    c = await Client.connect(server.port)
    await c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\nContent-Length: 101\r\n\r\n")
    assert (await c.response())[0] == 413
    assert await c.closed_by_server()
    await c.aclose()
    c = await Client.connect(server.port)
    await c.send(b"GET /hello HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert (await c.response())[0] == 501
    await c.aclose()


async def test_a_failing_handler_gives_500_and_the_server_goes_on(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    status, _, body = await client.get("/boom")
    assert status == 500 and b"boom" not in body  # no internals to the client
    assert "handler for GET /boom failed" in caplog.text
    assert (await client.get("/hello"))[0] == 200


async def test_idle_connections_are_closed_after_the_idle_timeout(client: Client) -> None:
    assert (await client.get("/hello"))[0] == 200
    assert await client.closed_by_server()  # idle_timeout_s=1.0


async def test_a_request_head_trickling_in_is_cut_at_the_idle_timeout(client: Client) -> None:
    await client.send(b"GET /hello HTTP/1.1\r\n")
    assert await client.closed_by_server()


async def test_aclose_closes_idle_connections_and_lets_a_request_in_flight_finish(
    server: HttpServer, gate: asyncio.Event
) -> None:
    idle = await Client.connect(server.port)
    assert (await idle.get("/hello"))[0] == 200
    busy = await Client.connect(server.port)
    await busy.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
    await asyncio.sleep(0.05)
    closing = asyncio.create_task(server.aclose())
    assert await idle.closed_by_server()
    assert not closing.done()
    gate.set()
    status, headers, body = await busy.response()
    assert (status, body, headers["connection"]) == (200, b"slow done", "close")
    await asyncio.wait_for(closing, 5)
    with pytest.raises(OSError):
        await Client.connect(server.port)  # no longer listening
    await server.aclose()  # idempotent
    await idle.aclose()
    await busy.aclose()


async def test_aclose_cancels_requests_that_outlive_its_timeout(server: HttpServer) -> None:
    busy = await Client.connect(server.port)
    await busy.send(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
    await asyncio.sleep(0.05)
    await asyncio.wait_for(server.aclose(timeout_s=0.2), 3)
    assert await busy.closed_by_server()
    await busy.aclose()


async def test_a_closed_server_cannot_start_again(server: HttpServer) -> None:
    await server.aclose()
    with pytest.raises(RuntimeError):
        await server.start()


async def test_cors_origin_is_on_every_response_and_preflight_is_answered() -> None:
    router = Router()
    router.add("/hello", lambda req: text("hello"))
    async with HttpServer(router, "127.0.0.1", 0, cors_origin="*") as s:
        c = await Client.connect(s.port)
        for path in ("/hello", "/nope"):
            assert (await c.get(path))[1]["access-control-allow-origin"] == "*"
        await c.send(b"OPTIONS /hello HTTP/1.1\r\nHost: t\r\nOrigin: http://x\r\n\r\n")
        status, headers, _ = await c.response(head_only=True)
        assert status == 204 and "content-length" not in headers
        assert headers["access-control-allow-methods"] == "GET, HEAD"
        assert "authorization" in headers["access-control-allow-headers"]
        assert (await c.get("/hello"))[2] == b"hello"
        await c.aclose()


async def test_server_errors_use_the_given_renderer() -> None:
    def render(status: int, message: str) -> Response:
        return status, {"content-type": "application/json"}, f'{{"status":{status}}}'.encode()

    async with HttpServer(Router(), "127.0.0.1", 0, render_error=render) as s:
        c = await Client.connect(s.port)
        status, headers, body = await c.get("/nope")
        assert (status, headers["content-type"], body) == (404, "application/json", b'{"status":404}')
        await c.aclose()


async def test_a_stdlib_client_can_use_it_with_keep_alive(server: HttpServer) -> None:
    def fetch() -> list[tuple[int, bytes]]:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        try:
            out = []
            for path in ("/hello", "/items/r1/x/2?after=3", "/nope"):
                conn.request("GET", path)
                resp = conn.getresponse()
                out.append((resp.status, resp.read()))
            return out
        finally:
            conn.close()

    results = await asyncio.to_thread(fetch)
    assert [r[0] for r in results] == [200, 200, 404]
    assert results[1][1] == b"GET {'room': 'r1', 'n': '2'} [('after', '3')] "


def test_routes_must_start_with_a_slash() -> None:
    with pytest.raises(ValueError):
        Router().add("hello", lambda req: text("x"))
