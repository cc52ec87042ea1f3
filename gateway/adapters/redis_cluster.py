"""Sharded pub/sub over a Redis Cluster (redis_mode=cluster).

Plain PUBLISH in a cluster is copied to every node, so its throughput falls
as nodes are added. Sharded pub/sub routes a channel by its
hash slot: the gateway SSUBSCRIBEs each room channel on the node owning the
slot, over one connection per node (not per channel), and the relay
SPUBLISHes to that node. When a slot moves (MOVED, or a node connection is
lost), the slot map is read again and the channels follow their slots; the
rooms' gap check fills whatever was missed in between.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from urllib.parse import urlparse

import redis.asyncio as aioredis
from redis.crc import key_slot

from gateway.adapters.redis_sub import MessageBatch, RedisSubscriber

__all__ = ["ClusterSubscriber"]

log = logging.getLogger("roomcast.gateway.redis")

Node = tuple[str, int]


class ClusterSubscriber:
    """The RedisSubscriber interface over every master node of a cluster."""

    def __init__(
        self, url: str, on_messages: Callable[[MessageBatch], None], on_connected: Callable[[bool], None] | None = None
    ) -> None:
        self.url = url
        parsed = urlparse(url)
        self.seed: Node = (parsed.hostname or "127.0.0.1", parsed.port or 6379)
        self.auth = f"{parsed.username or ''}:{parsed.password}@" if parsed.password else ""
        self.on_messages = on_messages
        self.on_connected = on_connected
        self.nodes: dict[Node, RedisSubscriber] = {}
        self.slot_owner: list[Node | None] = [None] * 16384
        self.routes: dict[bytes, Node] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._started = False

    # ---- the RedisSubscriber interface ----------------------------------------

    @property
    def connected(self) -> bool:
        return bool(self.nodes) and all(sub.connected for sub in self.nodes.values())

    @property
    def reconnects(self) -> int:
        return sum(sub.reconnects for sub in self.nodes.values())

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        delay = 0.1
        while True:
            try:
                await self._load_slots()
                return
            except (OSError, aioredis.RedisError) as exc:
                log.warning("redis cluster %s:%d unreachable (%s); retrying", *self.seed, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def wait_connected(self, timeout_s: float) -> bool:
        results = await asyncio.gather(*(sub.wait_connected(timeout_s) for sub in self.nodes.values()))
        return bool(results) and all(results)

    def subscribe(self, channel: bytes) -> asyncio.Future[None]:
        node = self._owner(channel)
        self.routes[channel] = node
        return self.nodes[node].subscribe(channel)

    def unsubscribe(self, channel: bytes) -> None:
        node = self.routes.pop(channel, None)
        if node is not None and node in self.nodes:
            self.nodes[node].unsubscribe(channel)

    def is_confirmed(self, channel: bytes) -> bool:
        node = self.routes.get(channel)
        return node is not None and node in self.nodes and self.nodes[node].is_confirmed(channel)

    async def aclose(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        await asyncio.gather(*(sub.aclose() for sub in self.nodes.values()))

    # ---- slots ------------------------------------------------------------------

    def _owner(self, channel: bytes) -> Node:
        node = self.slot_owner[key_slot(channel)]
        if node is None:
            raise RuntimeError(f"no cluster node owns the slot of {channel!r}")
        return node

    async def _load_slots(self) -> None:
        """Read CLUSTER SLOTS from any known node; open a subscriber per new master."""
        candidates = [self.seed, *self.nodes]
        last_exc: Exception | None = None
        for host, port in candidates:
            client = aioredis.Redis.from_url(f"redis://{self.auth}{host}:{port}", socket_timeout=3, socket_connect_timeout=2)
            try:
                slots = await client.execute_command("CLUSTER SLOTS")
                break
            except (OSError, aioredis.RedisError) as exc:
                last_exc = exc
            finally:
                await client.aclose()
        else:
            raise last_exc or OSError("no cluster node answered")
        owner: list[Node | None] = [None] * 16384
        for entry in slots:
            start, end, master = entry[0], entry[1], entry[2]
            host = master[0].decode() if isinstance(master[0], bytes) else master[0]
            node = (host or self.seed[0], int(master[1]))
            for slot in range(int(start), int(end) + 1):
                owner[slot] = node
        self.slot_owner = owner
        for node in set(n for n in owner if n is not None):
            if node not in self.nodes:
                sub = RedisSubscriber(
                    f"redis://{self.auth}{node[0]}:{node[1]}",
                    self.on_messages,
                    self._node_connected,
                    sharded=True,
                    on_moved=self.refresh,
                )
                self.nodes[node] = sub
                await sub.start()
        self._reroute()

    def _reroute(self) -> None:
        """Move every channel whose slot changed owner to its new node's connection."""
        for channel, node in list(self.routes.items()):
            new = self.slot_owner[key_slot(channel)]
            if new is not None and new != node:
                waiters = self.nodes[node].drop_channel(channel) if node in self.nodes else []
                self.routes[channel] = new
                self.nodes[new].adopt(channel, waiters)
                log.info("channel %r moved to %s:%d", channel, *new)

    def refresh(self) -> None:
        """Re-read the slot map soon (once at a time)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        try:
            await self._load_slots()
        except (OSError, aioredis.RedisError) as exc:
            log.warning("reading the cluster slot map failed: %s", exc)

    def _node_connected(self, reconnected: bool) -> None:
        if reconnected:
            self.refresh()
        if self.on_connected is not None:
            self.on_connected(reconnected)
