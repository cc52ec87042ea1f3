"""The gateway's pooled history client against a scripted TCP server: what a pooled connection can meet."""

from __future__ import annotations

import asyncio
import json

from gateway.adapters.history import HistoryClient

PAGE = json.dumps({"room": "r1", "latest_seq": 1, "messages": [{"id": "x", "room": "r1", "seq": 1, "extra": [1, 2]}]}).encode()


async def test_a_pooled_connection_closed_under_a_request_is_retried_once_on_a_new_one() -> None:
    # The race keep-alive leaves open: the server closes an idle connection
    # just as the client sends on it. Here every connection answers one
    # request and then closes on the next without answering it.
    accepted = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(PAGE), PAGE))
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = HistoryClient(f"http://127.0.0.1:{port}/", pool_size=1)
    try:
        assert await client.page("r1", after=0) == (1, [(1, PAGE[PAGE.index(b'{"id"') : -2])])
        # The second GET goes out on the kept connection, which the server closes unanswered.
        latest, events = await client.page("r1", after=0)
        assert latest == 1 and events[0][0] == 1
        assert accepted == 2
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()
