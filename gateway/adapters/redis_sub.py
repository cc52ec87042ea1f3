"""The gateway's one Redis subscriber connection: a bare hiredis reader on an asyncio Protocol.

Why not redis-py's PubSub: its `listen()` returns once the last channel is
unsubscribed, it opens its connection lazily (two racing first SUBSCRIBEs
opened two connections and lost one), and its per-message
object path is slower than feeding hiredis directly.

Every message of one socket read is handed over in one call, grouped by
channel in arrival order, so the fan-out can frame a room's messages of that
read as one buffer (coalescing without any added delay).

A control channel stays subscribed so the connection never idles out of the
subscribed state. On a lost connection it reconnects with backoff and
re-subscribes every wanted channel; `on_connected(reconnected=True)` lets the
gateway check those rooms for a gap.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable
from urllib.parse import unquote, urlparse

from gateway.adapters.resp_push import MessageBatch, PushReader
from roomcast.wire.control import CONTROL_CHANNEL as WIRE_CONTROL_CHANNEL

__all__ = ["RedisSubscriber", "MessageBatch", "encode_command"]

log = logging.getLogger("roomcast.gateway.redis")

# Always subscribed, so the connection exists before the first room's SUBSCRIBE
# and racing first joins cannot open a second one; it also carries the
# operators' commands (roomcast.wire.control).
CONTROL_CHANNEL = WIRE_CONTROL_CHANNEL.encode()


def encode_command(*args: bytes) -> bytes:
    """A RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


# One read takes up to this much: under load a bigger read brings more
# messages per room, which are framed once and written once per socket.
READ_BUFFER_BYTES = 4 * 1024 * 1024


class _SubscriberProtocol(asyncio.BufferedProtocol):
    def __init__(self, owner: RedisSubscriber) -> None:
        self.owner = owner
        self.reader = PushReader()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray(READ_BUFFER_BYTES)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        read = self.reader.read(self.buffer, nbytes)
        owner = self.owner
        for channel in read.confirmed:
            owner._confirmed(channel)
        if read.pongs:
            owner._pong()
        for error in read.errors:
            log.error("redis refused a subscriber command: %s", error)
            if error.startswith("MOVED"):
                owner._moved()
        if read.malformed:
            log.warning("skipped %d redis replies of an unexpected shape", read.malformed)
        if read.messages:
            try:
                owner.on_messages(read.messages)
            except Exception:
                log.exception("fan-out of a redis read failed")
        if read.protocol_error is not None and self.transport is not None:
            # hiredis cannot find the next reply after bytes it could not
            # parse: reconnect, which re-subscribes and checks rooms for a gap.
            log.error("redis sent bytes that are not RESP (%s); dropping the connection", read.protocol_error)
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost(self, exc)


class RedisSubscriber:
    """One pub/sub connection per process with reconnect and re-subscribe.

    `on_messages(batch)` runs synchronously inside the read callback.
    """

    def __init__(
        self,
        url: str,
        on_messages: Callable[[MessageBatch], None],
        on_connected: Callable[[bool], None] | None = None,
        *,
        reconnect_min_s: float = 0.05,
        reconnect_max_s: float = 2.0,
        ping_interval_s: float = 5.0,
        sharded: bool = False,
        on_moved: Callable[[], None] | None = None,
    ) -> None:
        # sharded: SSUBSCRIBE/SUNSUBSCRIBE on one node of a Redis Cluster; the
        # caller routes each channel to the node that owns its slot.
        self._sub = b"SSUBSCRIBE" if sharded else b"SUBSCRIBE"
        self._unsub = b"SUNSUBSCRIBE" if sharded else b"UNSUBSCRIBE"
        self._control = None if sharded else CONTROL_CHANNEL
        self.on_moved = on_moved
        parsed = urlparse(url)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 6379
        self.password = unquote(parsed.password) if parsed.password else None
        self.username = unquote(parsed.username) if parsed.username else None
        self.on_messages = on_messages
        self.on_connected = on_connected
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.ping_interval_s = ping_interval_s
        self._wanted: set[bytes] = set()
        # Per channel, one deque entry per SUBSCRIBE sent on this connection,
        # holding the futures that wait for its confirmation (replies arrive in
        # command order, so FIFO matches them).
        self._pending: dict[bytes, deque[list[asyncio.Future[None]]]] = {}
        self._protocol: _SubscriberProtocol | None = None
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._ever_connected = False
        self._pong_waiter: asyncio.Future[None] | None = None
        self._orphans: dict[bytes, list[asyncio.Future[None]]] = {}
        self._disconnected = asyncio.Event()
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        return self._protocol is not None

    async def start(self) -> None:
        """Start connecting in the background. Idempotent; never raises for an unreachable Redis."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="redis-subscriber")

    async def wait_connected(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False

    def subscribe(self, channel: bytes) -> asyncio.Future[None]:
        """Want channel; the future resolves once Redis confirmed the SUBSCRIBE.

        While disconnected the future waits for the reconnect's SUBSCRIBE.
        """
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._wanted.add(channel)
        proto = self._protocol
        if proto is not None and proto.transport is not None:
            self._pending.setdefault(channel, deque()).append([fut])
            proto.transport.write(encode_command(self._sub, channel))
        else:
            self._orphan(channel, fut)
        return fut

    def is_confirmed(self, channel: bytes) -> bool:
        """Subscribed on the current connection, with no SUBSCRIBE awaiting its reply."""
        return self._protocol is not None and channel in self._wanted and channel not in self._pending

    def unsubscribe(self, channel: bytes) -> None:
        self._wanted.discard(channel)
        proto = self._protocol
        if proto is not None and proto.transport is not None:
            proto.transport.write(encode_command(self._unsub, channel))

    def _orphan(self, channel: bytes, fut: asyncio.Future[None]) -> None:
        # Parked until the next connection sends this channel's SUBSCRIBE.
        self._orphans.setdefault(channel, []).append(fut)

    def _confirmed(self, channel: bytes) -> None:
        queue = self._pending.get(channel)
        if not queue:
            return
        for fut in queue.popleft():
            if not fut.done():
                fut.set_result(None)
        if not queue:
            del self._pending[channel]

    def _moved(self) -> None:
        # A slot moved to another node: the caller re-reads the slot map.
        if self.on_moved is not None:
            self.on_moved()

    def drop_channel(self, channel: bytes) -> list[asyncio.Future[None]]:
        """Forget a channel without telling Redis (it moved to another node's
        connection); returns its unconfirmed waiters so they can follow it."""
        self._wanted.discard(channel)
        waiters = [fut for futs in self._pending.pop(channel, deque()) for fut in futs]
        waiters += self._orphans.pop(channel, [])
        return waiters

    def adopt(self, channel: bytes, waiters: list[asyncio.Future[None]]) -> None:
        """Take over a channel from another node's connection, with its waiters."""
        fut = self.subscribe(channel)
        for waiter in waiters:
            fut.add_done_callback(lambda f, w=waiter: w.done() or w.set_result(None))

    def _pong(self) -> None:
        if self._pong_waiter is not None and not self._pong_waiter.done():
            self._pong_waiter.set_result(None)

    def _lost(self, proto: _SubscriberProtocol, exc: Exception | None) -> None:
        if self._protocol is not proto:
            return
        self._protocol = None
        self._connected.clear()
        # Every unconfirmed SUBSCRIBE is re-sent by the next connection.
        for channel, queue in self._pending.items():
            for futs in queue:
                self._orphans.setdefault(channel, []).extend(futs)
        self._pending.clear()
        if not self._closing:
            log.warning("redis subscriber connection lost (%s); reconnecting", exc or "closed by server")
            self._disconnected.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.reconnect_min_s
        while not self._closing:
            try:
                _, proto = await asyncio.wait_for(
                    loop.create_connection(lambda: _SubscriberProtocol(self), self.host, self.port), 5.0
                )
            except (OSError, asyncio.TimeoutError) as exc:
                log.warning("redis %s:%d unreachable (%s); retrying in %.2f s", self.host, self.port, exc, delay)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.reconnect_max_s)
                continue
            delay = self.reconnect_min_s
            self._install(proto)
            reconnected = self._ever_connected
            self._ever_connected = True
            if reconnected:
                self.reconnects += 1
            log.info("redis subscriber connected to %s:%d (%d channels)", self.host, self.port, len(self._wanted))
            self._connected.set()
            if self.on_connected is not None:
                try:
                    self.on_connected(reconnected)
                except Exception:
                    log.exception("on_connected callback failed")
            await self._watch(proto)

    def _install(self, proto: _SubscriberProtocol) -> None:
        assert proto.transport is not None
        self._protocol = proto
        self._disconnected.clear()
        commands = []
        if self.password is not None:
            auth = (self.username.encode(), self.password.encode()) if self.username else (self.password.encode(),)
            commands.append(encode_command(b"AUTH", *auth))
        if self._control is not None:
            commands.append(encode_command(self._sub, self._control))
        orphans, self._orphans = self._orphans, {}
        for channel in self._wanted:
            self._pending.setdefault(channel, deque()).append(orphans.pop(channel, []))
            commands.append(encode_command(self._sub, channel))
        # Waiters for channels no longer wanted: nothing to confirm.
        for futs in orphans.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(None)
        proto.transport.write(b"".join(commands))

    async def _watch(self, proto: _SubscriberProtocol) -> None:
        """Ping periodically: a half-open connection is found within ~2 intervals."""
        while not self._closing and self._protocol is proto:
            try:
                await asyncio.wait_for(self._disconnected.wait(), self.ping_interval_s)
                return
            except asyncio.TimeoutError:
                pass
            self._pong_waiter = asyncio.get_running_loop().create_future()
            if proto.transport is None:
                return
            proto.transport.write(encode_command(b"PING"))
            try:
                await asyncio.wait_for(asyncio.shield(self._pong_waiter), self.ping_interval_s)
            except asyncio.TimeoutError:
                log.warning("redis subscriber missed a pong; dropping the connection")
                proto.transport.abort()
                return

    async def aclose(self) -> None:
        """Close the connection and stop reconnecting. Idempotent."""
        self._closing = True
        proto = self._protocol
        if proto is not None and proto.transport is not None:
            proto.transport.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        for futs in self._orphans.values():
            for fut in futs:
                fut.cancel()
