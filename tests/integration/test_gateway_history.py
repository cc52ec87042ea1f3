"""The gateway's history client against a real chat service (SQLite), real Redis and the real embedded broker.

Pooling: many joins with `since` share a few keep-alive connections (counted
by the chat service's roomcast_chat_http_connections_total). The service
credential: replay and gap fill work when user tokens are RS256 only, and the
older HS256 path still works; a wrong service key gets 401.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import msgspec
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from chat.app import ChatService
from chat.storage import open_store
from gateway.worker import GatewayWorker
from roomcast.auth import mint
from roomcast.service_auth import SERVICE_TOKEN_HEADER
from roomcast.config import ConfigError
from tests.integration.chat_harness import RunningChat, chat_config, http_get, post, record, wait_until
from tests.integration.gateway_harness import base_config, start_gateway, ws_url
from tests.support import Client, scaled

SERVICE_KEY = "service-key-of-the-test-at-least-32-bytes"
HS256_SECRET = "user-token-secret-at-least-32-bytes!!"


@dataclass(frozen=True)
class Rsa:
    private_pem: bytes
    public_pem: str


@pytest.fixture(scope="module")
def rsa_keys() -> Rsa:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return Rsa(private_pem, public_pem)


def rs256_token(keys: Rsa, sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, keys.private_pem, algorithm="RS256")


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
async def gateways() -> AsyncIterator[list[GatewayWorker]]:
    started: list[GatewayWorker] = []
    yield started
    for app in started:
        await app.drain()


# ---- pooling ----------------------------------------------------------------------------


POOL = 8
SOCKETS = 250
ROOMS = [f"pool-room-{i}" for i in range(4)]


async def test_a_thousand_joins_with_since_open_no_more_connections_than_the_pool(
    bootstrap: str, redis_url: str, tmp_path: Path, producer: AIOKafkaProducer,
    services: list[RunningChat], gateways: list[GatewayWorker],
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


# ---- the service credential ----------------------------------------------------------------


def auth_settings(mode: str, keys: Rsa) -> tuple[dict[str, object], dict[str, object], str]:
    """(chat settings, gateway settings, a user token) of each auth set-up under test."""
    if mode == "rs256-only":
        common: dict[str, object] = dict(auth_mode="jwt", jwt_public_key=keys.public_pem, service_key=SERVICE_KEY)
        return common, common, rs256_token(keys, "alice")
    assert mode == "hs256-without-service-key"  # the older path: the gateway signs with jwt_secret
    common = dict(auth_mode="jwt", jwt_secret=HS256_SECRET)
    return common, common, mint(HS256_SECRET, "alice")


async def start_auth_stack(
    mode: str, keys: Rsa, bootstrap: str, redis_url: str, tmp_path: Path, producer: AIOKafkaProducer,
    services: list[RunningChat], gateways: list[GatewayWorker], room: str,
) -> tuple[RunningChat, GatewayWorker, Client]:
    """A chat service holding 1..3 of `room`, a gateway on it, and a client with a user token."""
    chat_over, gateway_over, token = auth_settings(mode, keys)
    chat = await start_chat(bootstrap, tmp_path, services, **chat_over)
    await post_and_wait(producer, chat, room, 3)
    # No Kafka at the gateway: what the chat service stores is not relayed to
    # Redis, so the test decides which events Redis carries.
    gateways.append(app := await start_gateway(base_config(
        redis_url, history_url=f"http://127.0.0.1:{chat.port}/", **gateway_over
    )))
    return chat, app, await Client.connect(ws_url(app) + f"?token={token}")


MODES = ["rs256-only", "hs256-without-service-key"]


@pytest.mark.parametrize("mode", MODES)
async def test_a_join_with_since_replays_from_history(
    mode: str, rsa_keys: Rsa, bootstrap: str, redis_url: str, tmp_path: Path, producer: AIOKafkaProducer,
    services: list[RunningChat], gateways: list[GatewayWorker],
) -> None:
    room = "replay-room"
    _, _, client = await start_auth_stack(mode, rsa_keys, bootstrap, redis_url, tmp_path, producer, services, gateways, room)
    joined = await client.join(room, since=0)
    assert (joined["seq"], joined.get("recovered", True)) == (3, True)
    assert [m["seq"] for m in await client.collect(room, 3)] == [1, 2, 3]
    await client.close()


@pytest.mark.parametrize("mode", MODES)
async def test_a_seq_gap_on_redis_is_filled_from_history(
    mode: str, rsa_keys: Rsa, bootstrap: str, redis_url: str, tmp_path: Path, producer: AIOKafkaProducer,
    services: list[RunningChat], gateways: list[GatewayWorker],
) -> None:
    room = "gap-room"
    chat, app, client = await start_auth_stack(mode, rsa_keys, bootstrap, redis_url, tmp_path, producer, services, gateways, room)
    assert (await client.join(room))["seq"] == 3  # from history: the gateway knows where the room stands
    # 4, 5, 6 are stored but only 6 reaches Redis: the gateway must fetch 4
    # and 5 from history before it delivers 6.
    await post_and_wait(producer, chat, room, 3, first=4)
    page = await chat.service.store.history(room, 5, 1)
    publisher = aioredis.Redis.from_url(redis_url)
    try:
        assert await publisher.publish(f"room:{room}", msgspec.json.encode(page.messages[0])) == 1
    finally:
        await publisher.aclose()
    assert [m["seq"] for m in await client.collect(room, 3, timeout=20)] == [4, 5, 6]
    assert app.registry.stats.gaps_filled == 1
    await client.close()


async def test_a_wrong_service_key_is_refused_with_401_and_the_right_one_reads(
    rsa_keys: Rsa, bootstrap: str, tmp_path: Path, services: list[RunningChat],
) -> None:
    chat = await start_chat(
        bootstrap, tmp_path, services, auth_mode="jwt", jwt_public_key=rsa_keys.public_pem, service_key=SERVICE_KEY
    )
    target = "/rooms/r1/messages?after=0"
    wrong = mint("another-service-key-of-at-least-32-bytes", "gateway:gw-1", ttl_s=60)
    status, _, body = await http_get(chat.port, target, f"{SERVICE_TOKEN_HEADER}: {wrong}")
    assert status == 401, body
    assert b"signature" in body
    # A user's own token is no service token, even a valid one.
    status, _, _ = await http_get(chat.port, target, f"{SERVICE_TOKEN_HEADER}: {rs256_token(rsa_keys, 'gateway:x')}")
    assert status == 401
    expired = mint(SERVICE_KEY, "gateway:gw-1", ttl_s=60, now=lambda: time.time() - 3600)
    status, _, body = await http_get(chat.port, target, f"{SERVICE_TOKEN_HEADER}: {expired}")
    assert (status, b"expired" in body) == (401, True)
    right = mint(SERVICE_KEY, "gateway:gw-1", ttl_s=60)
    status, _, body = await http_get(chat.port, target, f"{SERVICE_TOKEN_HEADER}: {right}")
    assert status == 200, body
    # Users still read with their own RS256 token, beside the service credential.
    status, _, _ = await http_get(chat.port, target, f"Authorization: Bearer {rs256_token(rsa_keys, 'alice')}")
    assert status == 200


async def test_rs256_only_gateway_with_history_and_no_service_key_refuses_to_start(rsa_keys: Rsa, redis_url: str) -> None:
    config = base_config(
        redis_url, auth_mode="jwt", jwt_public_key=rsa_keys.public_pem, history_url="http://127.0.0.1:1/"
    )
    with pytest.raises(ConfigError, match="service_key"):
        GatewayWorker(config)


async def test_joins_with_since_go_on_after_the_chat_service_restarts_under_the_pool(
    bootstrap: str, redis_url: str, tmp_path: Path, producer: AIOKafkaProducer,
    services: list[RunningChat], gateways: list[GatewayWorker],
) -> None:
    chat = await start_chat(bootstrap, tmp_path, services)
    await post_and_wait(producer, chat, "r1", 2)
    gateways.append(app := await start_gateway(base_config(
        redis_url, history_url=f"http://127.0.0.1:{chat.port}/", history_pool_size=2
    )))
    first = await Client.connect(ws_url(app), user="a")
    assert (await first.join("r1", since=0))["seq"] == 2  # leaves a pooled connection behind
    await chat.stop()  # closes its idle connections: the pooled one is dead now
    chat = await start_chat(bootstrap, tmp_path, services, http_port=chat.port)
    for user in ("b", "c", "d"):
        client = await Client.connect(ws_url(app), user=user)
        joined = await client.join("r1", since=0)
        assert (joined["seq"], joined.get("recovered", True)) == (2, True)
        assert [m["seq"] for m in await client.collect("r1", 2)] == [1, 2]
        await client.close()
    await first.close()
