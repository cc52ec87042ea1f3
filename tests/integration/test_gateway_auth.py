"""PROTOCOL.md 1 at a real gateway: tokens at the upgrade, rooms globs on join and send."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import websockets

from gateway.app import GatewayApp
from roomcast.auth import mint
from tests.integration.test_gateway import base_config, start_gateway, ws_url
from tests.support import Client

SECRET = "test-secret-of-at-least-32-bytes!!"


@pytest.fixture
async def jwt_gateway(redis_url: str) -> AsyncIterator[GatewayApp]:
    app = await start_gateway(base_config(redis_url, auth_mode="jwt", jwt_secret=SECRET))
    yield app
    await app.drain()


async def refused_status(url: str, **kwargs: object) -> tuple[int, bytes]:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(url, **kwargs)  # type: ignore[arg-type]
    return refused.value.response.status_code, refused.value.response.body or b""


async def test_missing_token_is_refused_with_401_at_the_upgrade(jwt_gateway: GatewayApp) -> None:
    status, body = await refused_status(ws_url(jwt_gateway) + "?user=mallory")
    assert status == 401
    assert b"token" in body


async def test_forged_token_is_refused_with_401(jwt_gateway: GatewayApp) -> None:
    forged = mint("another-secret-of-at-least-32-bytes", "alice")
    status, _ = await refused_status(ws_url(jwt_gateway) + f"?token={forged}")
    assert status == 401


async def test_expired_token_is_refused_with_401(jwt_gateway: GatewayApp) -> None:
    expired = mint(SECRET, "alice", ttl_s=60, now=lambda: time.time() - 3600)
    status, body = await refused_status(ws_url(jwt_gateway), additional_headers={"Authorization": f"Bearer {expired}"})
    assert status == 401
    assert b"expired" in body


async def test_valid_token_in_header_or_query_names_the_user(jwt_gateway: GatewayApp) -> None:
    token = mint(SECRET, "alice")
    c = await Client.connect(ws_url(jwt_gateway) + f"?token={token}")
    await c.join("any-room")
    c2 = await Client.connect(ws_url(jwt_gateway), additional_headers={"Authorization": f"Bearer {token}"})
    await c2.join("any-room")
    assert {conn.session.user for conn in jwt_gateway.connections} == {"alice"}
    await c.close()
    await c2.close()


async def test_rooms_claim_is_enforced_on_join_and_on_send(jwt_gateway: GatewayApp) -> None:
    token = mint(SECRET, "bob", rooms=["team-*", "lobby"])
    c = await Client.connect(ws_url(jwt_gateway) + f"?token={token}")
    assert (await c.join("team-red"))["room"] == "team-red"
    assert (await c.join("lobby"))["room"] == "lobby"
    await c.send({"type": "join", "room": "secret"})
    error = await c.expect("error")
    assert (error["code"], error["ref"]) == ("forbidden", "join")
    await c.send({"type": "message.send", "room": "secret", "body": "x", "client_msg_id": "c-1"})
    error = await c.expect("error")
    assert (error["code"], error["ref"]) == ("forbidden", "c-1")
    await c.close()
