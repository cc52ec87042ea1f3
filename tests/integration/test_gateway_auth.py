"""PROTOCOL.md 1 at a real gateway: tokens at the upgrade, rooms globs on join and send."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator

import pytest
import websockets

from gateway.worker import GatewayWorker
from roomcast.auth import mint
from roomcast.embedded import free_port
from tests.integration.gateway_harness import base_config, start_gateway, ws_url
from tests.support import Client, close_code, revoke, scaled

SECRET = "test-secret-of-at-least-32-bytes!!"


@pytest.fixture
async def jwt_gateway(redis_url: str) -> AsyncIterator[GatewayWorker]:
    app = await start_gateway(base_config(redis_url, auth_mode="jwt", jwt_secret=SECRET))
    yield app
    await app.drain()


async def refused_status(url: str, **kwargs: object) -> tuple[int, bytes]:
    with pytest.raises(websockets.InvalidStatus) as refused:
        await websockets.connect(url, **kwargs)  # type: ignore[arg-type]
    return refused.value.response.status_code, refused.value.response.body or b""


async def test_missing_token_is_refused_with_401_at_the_upgrade(jwt_gateway: GatewayWorker) -> None:
    status, body = await refused_status(ws_url(jwt_gateway) + "?user=mallory")
    assert status == 401
    assert b"token" in body


async def test_forged_token_is_refused_with_401(jwt_gateway: GatewayWorker) -> None:
    forged = mint("another-secret-of-at-least-32-bytes", "alice")
    status, _ = await refused_status(ws_url(jwt_gateway) + f"?token={forged}")
    assert status == 401


async def test_expired_token_is_refused_with_401(jwt_gateway: GatewayWorker) -> None:
    expired = mint(SECRET, "alice", ttl_s=60, now=lambda: time.time() - 3600)
    status, body = await refused_status(ws_url(jwt_gateway), additional_headers={"Authorization": f"Bearer {expired}"})
    assert status == 401
    assert b"expired" in body


async def test_valid_token_in_header_or_query_names_the_user(jwt_gateway: GatewayWorker) -> None:
    token = mint(SECRET, "alice")
    c = await Client.connect(ws_url(jwt_gateway) + f"?token={token}")
    await c.join("any-room")
    c2 = await Client.connect(ws_url(jwt_gateway), additional_headers={"Authorization": f"Bearer {token}"})
    await c2.join("any-room")
    assert {conn.session.user for conn in jwt_gateway.connections} == {"alice"}
    await c.close()
    await c2.close()


async def test_rooms_claim_is_enforced_on_join_and_on_send(jwt_gateway: GatewayWorker) -> None:
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


# ---- v1.1 token lifetime and revocation (PROTOCOL.md 9) ----------------------------------


async def test_socket_is_closed_with_4001_at_its_tokens_exp(jwt_gateway: GatewayWorker) -> None:
    token = mint(SECRET, "alice", ttl_s=1.5)
    exp = jwt_claims(token)["exp"]
    c = await Client.connect(ws_url(jwt_gateway) + f"?token={token}")
    await c.join("r1")
    assert await close_code(c) == 4001
    # At exp, not a sweep later.
    assert exp <= time.time() < exp + scaled(0.5)
    assert jwt_gateway.access.expired == 1


async def test_refresh_moves_the_deadline_and_a_late_one_is_too_late(jwt_gateway: GatewayWorker) -> None:
    c = await Client.connect(ws_url(jwt_gateway) + f"?token={mint(SECRET, 'alice', ttl_s=1.5)}")
    await c.join("r1")
    fresh = mint(SECRET, "alice", ttl_s=3)
    await c.send({"type": "refresh", "token": fresh})
    refreshed = await c.expect("refreshed")
    assert refreshed == {"type": "refreshed", "exp": jwt_claims(fresh)["exp"]}
    await asyncio.sleep(2.0)  # past the first token's exp: still open
    assert (await c.join("r1"))["room"] == "r1"
    assert await close_code(c, timeout=5) == 4001  # the refreshed exp, without another refresh


async def test_refresh_with_another_users_or_a_bad_token_closes_with_4003(jwt_gateway: GatewayWorker) -> None:
    for bad in (
        mint(SECRET, "mallory"),
        mint("another-secret-of-at-least-32-bytes", "alice"),
        mint(SECRET, "alice", ttl_s=60, now=lambda: time.time() - 3600),
        "not-a-token",
    ):
        c = await Client.connect(ws_url(jwt_gateway) + f"?token={mint(SECRET, 'alice')}")
        await c.join("r1")
        await c.send({"type": "refresh", "token": bad})
        assert await close_code(c) == 4003, bad


async def test_rooms_a_refreshed_token_no_longer_allows_are_left_as_forbidden(jwt_gateway: GatewayWorker) -> None:
    c = await Client.connect(ws_url(jwt_gateway) + f"?token={mint(SECRET, 'bob', rooms=['team-*', 'lobby'])}")
    await c.join("team-red")
    await c.join("lobby")
    await c.send({"type": "refresh", "token": mint(SECRET, "bob", rooms=["lobby"])})
    await c.expect("refreshed")
    assert await c.expect("left") == {"type": "left", "room": "team-red", "reason": "forbidden"}
    await c.send({"type": "join", "room": "team-blue"})
    assert (await c.expect("error"))["code"] == "forbidden"
    assert (await c.join("lobby"))["room"] == "lobby"
    await c.close()


def jwt_claims(token: str) -> dict[str, object]:
    import jwt

    return jwt.decode(token, options={"verify_signature": False})  # type: ignore[no-any-return]


async def test_revoke_closes_every_socket_of_the_user_on_every_gateway_with_4002(redis_url: str) -> None:
    config = base_config(redis_url, auth_mode="jwt", jwt_secret=SECRET)
    gateways = [await start_gateway(config), await start_gateway(config)]
    old_token = mint(SECRET, "alice")
    try:
        alices = [await Client.connect(ws_url(app) + f"?token={old_token}") for app in gateways for _ in range(2)]
        bob = await Client.connect(ws_url(gateways[0]) + f"?token={mint(SECRET, 'bob')}")
        for c in (*alices, bob):
            await c.join("r1")
        started = time.monotonic()
        out = await revoke(redis_url, "alice")
        assert "2 gateway worker(s) told" in out
        codes = await asyncio.gather(*(close_code(c, timeout=1.0) for c in alices))
        assert codes == [4002] * 4
        assert time.monotonic() - started < scaled(3.0)  # the command's start-up included
        assert (await bob.join("r2"))["room"] == "r2"  # others are untouched
        # Tokens issued before the revocation are refused at the upgrade, on
        # a gateway that was running and on one started afterwards (the hash).
        late = await start_gateway(config)
        gateways.append(late)
        for app in gateways:
            status, body = await refused_status(ws_url(app) + f"?token={old_token}")
            assert (status, body) == (401, b"token revoked; ask for a new one\n")
        # A token issued after the revocation works.
        new_token = mint(SECRET, "alice", now=lambda: time.time() + 1.0)
        assert (await (await Client.connect(ws_url(late) + f"?token={new_token}")).join("r1"))["room"] == "r1"
        # A refresh with a revoked token is refused too.
        await bob.send({"type": "refresh", "token": old_token})
        assert await close_code(bob) == 4003
        # Lifted: the old token works again.
        await revoke(redis_url, "--lift", "alice")
        deadline = time.monotonic() + scaled(2)
        while any(app.access.revocations for app in gateways) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert (await (await Client.connect(ws_url(gateways[0]) + f"?token={old_token}")).join("r1"))["room"] == "r1"
    finally:
        for app in gateways:
            await app.drain()


async def test_a_gateway_that_missed_the_revocation_closes_the_sockets_on_reconnect(redis_url: str) -> None:
    import redis.asyncio as aioredis

    from roomcast.wire.control import REVOKED_HASH

    app = await start_gateway(base_config(redis_url, auth_mode="jwt", jwt_secret=SECRET))
    client = aioredis.Redis.from_url(redis_url)
    try:
        c = await Client.connect(ws_url(app) + f"?token={mint(SECRET, 'carol')}")
        await c.join("r1")
        # Recorded while this gateway's subscriber is cut: the PUBLISH is missed.
        await client.hset(REVOKED_HASH, "carol", repr(time.time()))
        await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        assert await close_code(c, timeout=10) == 4002
    finally:
        await client.hdel(REVOKED_HASH, "carol")
        await client.aclose()
        await app.drain()


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


async def test_no_secret_appears_on_any_gateway_process_command_line(redis_url: str) -> None:
    # The supervisor hands its config to the workers; `ps` shows every
    # command line to every local user, so the secret must not be on one.
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "roomcast.cli", "gateway", "--workers", "2", "--port", str(port), "--host", "127.0.0.1",
        "--redis-url", redis_url, "--auth-mode", "jwt", "--admin-port", "0",
        env=dict(os.environ, ROOMCAST_JWT_SECRET=SECRET), stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        for _ in range(2):
            line = await asyncio.wait_for(proc.stdout.readline(), scaled(20))
            assert b"ready" in line, line
        workers = children_of(proc.pid)
        assert len(workers) == 2
        for pid in (proc.pid, *workers):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            assert SECRET.encode() not in cmdline, cmdline
        for pid in workers:  # the workers do have it: they verify tokens with it
            with open(f"/proc/{pid}/environ", "rb") as f:
                assert b"ROOMCAST_JWT_SECRET=" + SECRET.encode() in f.read().split(b"\0")
        c = await Client.connect(f"ws://127.0.0.1:{port}/ws?token={mint(SECRET, 'alice')}")
        assert (await c.join("r1"))["room"] == "r1"
        await c.close()
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), scaled(30))
