"""The gateway's Redis client for commands: PUBLISH of the relay's events, reads of the revocation list.

(Subscriptions have their own connection: gateway/adapters/redis_sub.py and
redis_cluster.py.) On a Redis Cluster, events go out with SPUBLISH to the
node that owns the channel's slot (sharded pub/sub).
"""

from __future__ import annotations

import redis.asyncio as aioredis

from roomcast.wire.control import REVOKED_HASH
from roomcast.wire.events import ROOM_CHANNEL_PREFIX

__all__ = ["RedisPublisher"]

_ROOM_PREFIX = ROOM_CHANNEL_PREFIX.encode()


class RedisPublisher:
    def __init__(self, url: str, *, cluster: bool) -> None:
        self._client: aioredis.Redis | aioredis.RedisCluster
        if cluster:
            self._client = aioredis.RedisCluster.from_url(url, socket_timeout=5, socket_connect_timeout=2)
            self._command = "SPUBLISH"
        else:
            self._client = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)
            self._command = "PUBLISH"

    async def publish_events(self, records: list[tuple[bytes, bytes]]) -> None:
        """PUBLISH each (room key, event) on room:<id>, in order, in one round trip."""
        # A cluster pipeline sends each command to its slot's node.
        pipe = self._client.pipeline(transaction=False) if self._command == "PUBLISH" else self._client.pipeline()
        command = self._command
        for key, value in records:
            pipe.execute_command(command, _ROOM_PREFIX + key, value)
        await pipe.execute()

    async def revocations(self) -> dict[bytes, bytes]:
        """The revocation hash: user -> the moment of the revocation (gateway/access.py)."""
        return await self._client.hgetall(REVOKED_HASH)  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        await self._client.aclose()
