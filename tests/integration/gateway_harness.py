"""What the gateway's integration tests share: a config on the test's Redis, a started worker, its URL."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from gateway.worker import GatewayWorker
from roomcast.config import GatewayConfig
from tests.support import TEST_BROKER, scaled

__all__ = ["base_config", "start_gateway", "ws_url"]


def base_config(redis_url: str, **overrides: object) -> GatewayConfig:
    config = GatewayConfig(host="127.0.0.1", port=0, admin_port=0, redis_url=redis_url, kafka_profile=TEST_BROKER)
    return replace(config, **overrides)  # type: ignore[arg-type]


async def start_gateway(config: GatewayConfig) -> GatewayWorker:
    """A worker started in this loop, connected to Redis and done reading the revocations (as readiness asks)."""
    app = GatewayWorker(config)
    await app.start()
    assert await app.subscriber.wait_connected(scaled(5))
    deadline = time.monotonic() + scaled(5)
    while not app.access.loaded and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return app


def ws_url(app: GatewayWorker) -> str:
    return f"ws://127.0.0.1:{app.port}/ws"
