"""The gateway's history client: hand-written `Connection: close` vs httpx vs aiohttp, side by side.

    python -m bench.history_client                  # 2,000 sequential + 2,000 at 200 in flight, per client
    python -m bench.history_client --requests 500   # quicker
    flock /tmp/roomcast-bench.lock python -m bench.history_client   # on a shared box

The server is the chat service's own HTTP server (roomcast.http.HttpServer,
keep-alive) in a child process on uvloop, answering every
`GET /rooms/<room>/messages` with one fixed history page of 50 message
events (~11 KB, what a `since` replay of 50 messages returns); it counts the
TCP connections it accepted. The clients run in this process on uvloop, one
after the other, each against the same server:

close    the pre-pool HistoryClient._get: a new TCP connection per GET with
         `Connection: close` (copied here, as it was at commit 1e4682f);
httpx    httpx.AsyncClient, Limits(max_connections=pool, max_keepalive_connections=pool);
aiohttp  aiohttp.ClientSession over TCPConnector(limit=pool).

Each client gets both shapes: sequential (one GET at a time: the latency of
a lone join) and concurrent (`--concurrency` GETs in flight: a reconnect
storm). Reported: median and p99 latency per GET, GETs per second, and the
connections the server accepted. Exit status 1 when any GET failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

ROOM = "bench-room"
PAGE_MESSAGES = 50


def _page() -> bytes:
    events = [
        {
            "id": f"01BENCH{seq:019d}", "room": ROOM, "seq": seq, "user": f"user-{seq % 7}",
            "body": "a chat message of a typical length, say eighty characters or so, give or take!",
            "client_msg_id": f"c-{seq}", "ts": 1732650000000 + seq,
        }
        for seq in range(1, PAGE_MESSAGES + 1)
    ]
    return json.dumps({"room": ROOM, "latest_seq": PAGE_MESSAGES, "messages": events}, separators=(",", ":")).encode()


def _serve(port_out: multiprocessing.connection.Connection) -> None:  # type: ignore[name-defined]
    import uvloop

    from roomcast.http import HttpServer, Router

    body = _page()
    accepted = 0

    async def main() -> None:
        router = Router()
        router.add("/rooms/{room}/messages", lambda req: (200, {"content-type": "application/json"}, body))
        router.add("/accepted", lambda req: (200, {"content-type": "text/plain"}, str(accepted).encode()))
        server = HttpServer(router, "127.0.0.1", 0)
        original = server._serve

        async def counting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal accepted
            accepted += 1
            await original(reader, writer)

        server._serve = counting  # type: ignore[method-assign]
        await server.start()
        port_out.send(server.port)
        await asyncio.Event().wait()

    uvloop.run(main())


# ---- the three clients: each is get(path) -> body --------------------------------------


def close_client(host: str, port: int) -> tuple[Callable[[str], Awaitable[bytes]], Callable[[], Awaitable[None]]]:
    async def get(path: str) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
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
                raise ValueError(f"HTTP {status}")
            return body
        finally:
            writer.close()

    async def close() -> None:
        return None

    return get, close


def httpx_client(host: str, port: int, pool: int) -> tuple[Callable[[str], Awaitable[bytes]], Callable[[], Awaitable[None]]]:
    import httpx

    client = httpx.AsyncClient(
        base_url=f"http://{host}:{port}",
        limits=httpx.Limits(max_connections=pool, max_keepalive_connections=pool),
        timeout=httpx.Timeout(3.0),
    )

    async def get(path: str) -> bytes:
        response = await client.get(path)
        if response.status_code != 200:
            raise ValueError(f"HTTP {response.status_code}")
        return response.content

    return get, client.aclose


def aiohttp_client(host: str, port: int, pool: int) -> tuple[Callable[[str], Awaitable[bytes]], Callable[[], Awaitable[None]]]:
    import aiohttp

    session = aiohttp.ClientSession(
        f"http://{host}:{port}", connector=aiohttp.TCPConnector(limit=pool), timeout=aiohttp.ClientTimeout(total=3.0)
    )

    async def get(path: str) -> bytes:
        async with session.get(path) as response:
            body = await response.read()
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}")
            return body

    return get, session.close


async def _accepted(port: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /accepted HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
    raw = await reader.read()
    writer.close()
    return int(raw.partition(b"\r\n\r\n")[2]) - 1  # less this query's own connection


async def _measure(get: Callable[[str], Awaitable[bytes]], requests: int, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    path = f"/rooms/{ROOM}/messages?after=0&limit=500"
    counter = iter(range(requests))

    async def worker() -> None:
        nonlocal errors
        for _ in counter:
            started = time.perf_counter()
            try:
                await get(path)
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies) * 1000 if latencies else float("nan"),
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else float("nan"),
        "per_s": len(latencies) / elapsed,
        "errors": errors,
    }


async def _run(port: int, requests: int, concurrency: int, pool: int) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    makers = {
        "close": lambda: close_client("127.0.0.1", port),
        "httpx": lambda: httpx_client("127.0.0.1", port, pool),
        "aiohttp": lambda: aiohttp_client("127.0.0.1", port, pool),
    }
    for name, make in makers.items():
        for shape, inflight in (("sequential", 1), (f"{concurrency} in flight", concurrency)):
            before = await _accepted(port)
            get, close = make()
            await _measure(get, min(100, requests), inflight)  # warm-up: imports, first connections
            result = await _measure(get, requests, inflight)
            await close()
            result["connections"] = await _accepted(port) - before - 1  # less the `before` query's own
            rows.append({"client": name, "shape": shape, **result})
            print(
                f"{name:8} {shape:15} p50 {result['p50_ms']:7.3f} ms  p99 {result['p99_ms']:7.3f} ms  "
                f"{result['per_s']:8.0f} GET/s  {result['connections']:5.0f} connections  {result['errors']:.0f} errors",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000, help="GETs per client and shape")
    parser.add_argument("--concurrency", type=int, default=200, help="GETs in flight in the concurrent shape")
    parser.add_argument("--pool", type=int, default=16, help="pool size of httpx and aiohttp")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)

    import uvloop

    receive, send = multiprocessing.Pipe(duplex=False)
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(send,), daemon=True)
    server.start()
    try:
        port = receive.recv()
        print(f"server on 127.0.0.1:{port}; page {len(_page())} bytes; pool {args.pool}; Python {sys.version.split()[0]}")
        rows = uvloop.run(_run(port, args.requests, args.concurrency, args.pool))
    finally:
        server.kill()
        server.join()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    return 1 if any(row["errors"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
