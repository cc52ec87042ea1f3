"""The gateway's history client against a real chat service (SQLite), real Redis and the real embedded broker.

Pooling: many joins with `since` share a few keep-alive connections (counted
by the chat service's roomcast_chat_http_connections_total). 
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from chat.app import ChatService
from chat.storage import open_store
from gateway.app import GatewayApp
from tests.integration.chat_harness import RunningChat, chat_config, http_get, post, record, wait_until
from tests.integration.test_gateway import base_config, start_gateway, ws_url
from tests.support import Client, scaled

async def start_chat(bootstrap: str, tmp_path: Path, services: list[RunningChat], **over: object) -> RunningChat:
    config = chat_config(bootstrap, f"sqlite:///{tmp_path / 'chat.db'}", **over)
    running = RunningChat(ChatService(config, open_store(config.database_url)))
    services.append(running)
    await running.wait_ready()
    return running


async def post_and_wait(producer: AIOKafkaProducer, chat: RunningChat, room: str, count: int, first: int = 1) -> None:
    for n in range(first, first + count):
        await post(producer, record(room, f"{room}-c{n}"))
    target = first + count - 1
    await wait_until(lambda: _latest_is(chat, room, target), f"{room} stored up to seq {target}")


async def _latest_is(chat: RunningChat, room: str, seq: int) -> bool:
    return await chat.service.store.latest_seq(room) == seq


async def connections_total(chat: RunningChat) -> int:
    """roomcast_chat_http_connections_total, less the connection of this scrape itself."""
    status, _, body = await http_get(chat.port, "/metrics")
    assert status == 200
    m = re.search(rb"^roomcast_chat_http_connections_total (\d+)", body, re.M)
    assert m, body
    return int(m.group(1)) - 1


@pytest.fixture
async def gateways() -> AsyncIterator[list[GatewayApp]]:
    started: list[GatewayApp] = []
    yield started
    for app in started:
        await app.drain()


# ---- pooling ----------------------------------------------------------------------------


POOL = 8
SOCKETS = 250
ROOMS = [f"pool-room-{i}" for i in range(4)]


async def test_a_thousand_joins_with_since_open_no_more_connections_than_the_pool(
    bootstrap: str, redis_url: str, tmp_path: Path, producer: AIOKafkaProducer,
    services: list[RunningChat], gateways: list[GatewayApp],
) -> None:
    chat = await start_chat(bootstrap, tmp_path, services)
    for room in ROOMS:
        await post_and_wait(producer, chat, room, 2)
    gateways.append(app := await start_gateway(base_config(
        redis_url, history_url=f"http://127.0.0.1:{chat.port}/", history_pool_size=POOL,
        # The point is the connection count: a loaded box must not turn a slow page into a fallback.
        history_timeout_s=scaled(30),
    )))
    before = await connections_total(chat)

    async def reconnect(i: int) -> list[dict[str, object]]:
        # A client coming back after a drain: every room it was in, with `since`.
        client = await Client.connect(ws_url(app), user=f"u{i}")
        try:
            for room in ROOMS:
                await client.send({"type": "join", "room": room, "since": 0})
            joined = [await client.expect("joined", timeout=60) for _ in ROOMS]
            for room in ROOMS:  # the replay follows each `joined`
                assert [m["seq"] for m in await client.collect(room, 2)] == [1, 2]
            return joined
        finally:
            await client.close()

    results = await asyncio.gather(*(reconnect(i) for i in range(SOCKETS)))
    joins = [j for joined in results for j in joined]
    assert len(joins) == SOCKETS * len(ROOMS) == 1000
    assert all(j["seq"] == 2 and j.get("recovered", True) for j in joins)  # recovered:true is left out
    opened = await connections_total(chat) - before - 1  # less the `before` scrape's own connection
    assert 1 <= opened <= POOL, f"1,000 joins with since opened {opened} connections to the chat service (pool {POOL})"
