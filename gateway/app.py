"""One gateway worker: builds the core and the adapters, runs and drains them.

`serve(config)` runs `config.workers` worker processes on one port
(SO_REUSEPORT). Each worker is a full member: its own room registry, its own
Redis subscriber connection, its own consumer in realtime-gateway-group.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable

import redis.asyncio as aioredis
from picows import WSUpgradeRequest, WSUpgradeResponse, WSUpgradeResponseWithListener, ws_create_server

from gateway.access import AccessGuard
from gateway.adapters.framed import EchoListener, make_server_kwargs
from gateway.adapters.history import HistoryClient, HistoryUnavailable
from gateway.adapters.kafka import CreatedRelay, IngestProducer
from gateway.adapters.redis_cluster import ClusterSubscriber
from gateway.adapters.redis_sub import RedisSubscriber
from gateway.adapters.websocket import Connection
from gateway.core.rooms import Delivery, Room, RoomRegistry, frame_events
from gateway.core.session import CheckToken, Close, JoinRoom, LeaveRoom, Post, Reply, Session, SessionLimits
from roomcast.auth import AuthError, Authenticator, gateway_history_headers
from roomcast.config import GatewayConfig, env_name, gateway_id, to_environ
from roomcast.http import HttpServer, Router
from roomcast.metrics import SIZE_BUCKETS, MetricsRegistry
from roomcast.stopping import StopAction, StopSignals
from roomcast.wire.codes import CloseCode, ErrorCode
from roomcast.wire.control import CONTROL_CHANNEL, REVOKED_HASH
from roomcast.wire.events import ROOM_CHANNEL_PREFIX, encode_ingest
from roomcast.wire.frames import encode_ack, encode_error, encode_joined, encode_left

__all__ = ["GatewayApp", "run_worker", "serve"]

log = logging.getLogger("roomcast.gateway")

# A join waits this long for its SUBSCRIBE confirmation; past it (Redis down)
# it completes anyway and the reconnect's re-subscribe and gap check cover it.
SUBSCRIBE_WAIT_S = 2.0
# A `since` replay bigger than this is answered with recovered:false.
MAX_REPLAY = 5000
# A worker announces itself ready once connected, or after this long anyway.
READY_WAIT_S = 30.0
# A slow consumer that has not read its 4000 close after this long is cut.
SLOW_ABORT_S = 5.0
# A gap fill retries history this long before it lets the room go on with the gap.
FILL_GIVE_UP_S = 30.0
# Fills run at most this many at once (a Redis reconnect checks every room).
FILL_CONCURRENCY = 16


class GatewayApp:
    """The state and the wiring of one worker process."""

    def __init__(self, config: GatewayConfig, worker_index: int = 0) -> None:
        self.config = config
        self.worker_index = worker_index
        self.name = f"{gateway_id(config)}-{worker_index}"
        self.registry = RoomRegistry(fill_gaps=bool(config.history_url))
        self.limits = SessionLimits(
            max_body_bytes=config.max_body_bytes,
            send_rate_per_s=config.send_rate_per_s,
            send_burst=config.send_burst,
            abuse_max_errors=config.abuse_max_errors,
            abuse_window_ms=config.abuse_window_ms,
        )
        self.subscriber: RedisSubscriber | ClusterSubscriber
        self.publisher: aioredis.Redis | aioredis.RedisCluster
        if config.redis_mode == "cluster":
            # Sharded pub/sub: SSUBSCRIBE on each slot's node, SPUBLISH to it (PITFALLS.md 6).
            self.subscriber = ClusterSubscriber(config.redis_url, self.on_redis_messages, self.on_redis_connected)
            self.publisher = aioredis.RedisCluster.from_url(config.redis_url, socket_timeout=5, socket_connect_timeout=2)
            self._publish_command = "SPUBLISH"
        else:
            self.subscriber = RedisSubscriber(config.redis_url, self.on_redis_messages, self.on_redis_connected)
            self.publisher = aioredis.Redis.from_url(config.redis_url, socket_timeout=5, socket_connect_timeout=2)
            self._publish_command = "PUBLISH"
        self.producer = IngestProducer(
            config.kafka_bootstrap,
            linger_ms=config.produce_linger_ms,
            timeout_ms=config.produce_timeout_ms,
            client_id=self.name,
        )
        self.relay = CreatedRelay(
            config.kafka_bootstrap,
            self.publish_events,
            fetch_max_wait_ms=config.fetch_max_wait_ms,
            client_id=self.name,
            session_timeout_ms=config.kafka_session_timeout_ms,
            # Static membership: a restarted worker takes its partitions back
            # without a rebalance (real Kafka; the embedded broker cannot).
            static_membership=config.kafka_static_membership,
            on_stalled=self._on_relay_stalled,
        )
        self.exit_code = 0
        self.access = AccessGuard(Authenticator.from_config(config), self.perform, lambda: self.connections)
        self.history = HistoryClient(
            config.history_url,
            pool_size=config.history_pool_size,
            timeout_s=config.history_timeout_s,
            connect_timeout_s=config.history_connect_timeout_s,
            keepalive_s=config.history_keepalive_s,
            headers=_service_token(config, self.name),
        ) if config.history_url else None
        self.connections: set[Connection] = set()
        self.subscriptions: dict[str, asyncio.Future[None]] = {}
        self.server: asyncio.Server | None = None
        self.draining = False
        self.closed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._fill_slots = asyncio.Semaphore(FILL_CONCURRENCY)
        self.port = 0
        self.admin: HttpServer | None = None
        self._init_metrics()

    def _init_metrics(self) -> None:
        m = self.metrics = MetricsRegistry()
        stats = self.registry.stats
        m.gauge("roomcast_gateway_connections", "open client WebSockets", lambda: len(self.connections))
        m.gauge("roomcast_gateway_rooms", "rooms with a local socket (one Redis subscription each)", lambda: len(self.registry.rooms))
        m.gauge("roomcast_gateway_ready", "1 when ready: Redis and Kafka connected, revocations read, not draining", lambda: int(self.ready))
        self.m_joins = m.counter("roomcast_gateway_joins_total", "joins accepted")
        self.m_deliveries = m.counter("roomcast_gateway_deliveries_total", "messages written to sockets (message x socket)")
        self.m_batch = m.histogram("roomcast_gateway_fanout_batch_events", "events framed into one buffer per room per Redis read", SIZE_BUCKETS)
        self.m_fanout = m.histogram("roomcast_gateway_fanout_latency_seconds", "time to frame and write one Redis read to every socket")
        self.m_slow = m.counter("roomcast_gateway_slow_consumer_closes_total", "sockets closed with 4000")
        self.m_dead = m.counter("roomcast_gateway_dead_peer_drops_total", "sockets dropped for not answering a ping")
        m.counter_fn("roomcast_gateway_redis_reconnects_total", "Redis subscriber reconnects", lambda: self.subscriber.reconnects)
        m.counter_fn("roomcast_gateway_events_duplicate_total", "events dropped as already delivered", lambda: stats.events_duplicate)
        m.counter_fn("roomcast_gateway_events_malformed_total", "Redis payloads that are not a JSON object with an integer seq or none", lambda: stats.events_malformed)
        m.counter_fn(
            "roomcast_gateway_events_unsequenced_total", "events without seq (third-party publishers) passed through",
            lambda: stats.events_unsequenced,
        )
        m.counter_fn("roomcast_gateway_gaps_total", "gaps seen in a room's live stream", lambda: stats.gaps)
        m.counter_fn("roomcast_gateway_gap_fills_total", "fills from history that closed their gap", lambda: stats.gaps_filled)
        m.counter_fn("roomcast_gateway_gaps_unfilled_total", "fills that left a gap", lambda: stats.gaps_unfilled)
        self.m_posts = m.counter("roomcast_gateway_posts_total", "posts acked by Kafka")
        self.m_unavailable = m.counter("roomcast_gateway_posts_unavailable_total", "posts answered `unavailable`")
        self.m_produce = m.histogram("roomcast_gateway_kafka_produce_latency_seconds", "message.send to broker ack")
        m.counter_fn("roomcast_gateway_relay_published_total", "message.created events PUBLISHed by this worker", lambda: self.relay.published)
        m.counter_fn(
            "roomcast_gateway_relay_offset_holes_total", "message.created fetches held back at a hole in the offsets",
            lambda: self.relay.offsets.holes_waited,
        )
        m.gauge("roomcast_gateway_kafka_consumer_lag_messages", "message.created records not yet published", self.relay.lag)
        m.counter_fn("roomcast_gateway_token_expiry_closes_total", "sockets closed with 4001 at their token's exp", lambda: self.access.expired)
        m.counter_fn("roomcast_gateway_revocation_closes_total", "sockets closed with 4002 (user revoked)", lambda: self.access.revoked)
        m.counter_fn("roomcast_gateway_token_refreshes_total", "refresh frames accepted", lambda: self.access.refreshed)
        m.counter_fn(
            "roomcast_gateway_relay_watchdog_actions_total",
            "times the relay was found stuck (out of its group, or no progress with records waiting) and rejoined or gave up",
            lambda: self.relay.watchdog.actions,
        )

    # ---- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Start the adapters and the listener. Redis and Kafka may still be connecting."""
        await self.subscriber.start()
        self.subscriber.subscribe(_CONTROL_CHANNEL)  # revocations (gateway/access.py)
        await self.producer.start()
        await self.relay.start()
        self.server = await ws_create_server(
            self.route,
            self.config.host,
            self.config.port,
            reuse_port=True,
            websocket_handshake_timeout=5,
            # Dead peers are found by one heartbeat sweep per worker, not by
            # picows' auto-ping, which keeps a task per connection.
            enable_auto_ping=False,
            read_buffer_init_size=512,  # grows for bigger frames; idle sockets stay small
            # uvloop's own transports: as fast as aiofastnet's in the fan-out
            # benchmark and about 4 KiB less per idle connection (PERFORMANCE.md).
            use_aiofastnet=False,
            # The frame layer answers pings and enforces the size limit (1009)
            # on whole messages; picows refuses frames far over it from the
            # header alone, before buffering them.
            **make_server_kwargs(self.config.max_frame_bytes),
        )
        self.port = self.server.sockets[0].getsockname()[1]
        # Not in self._tasks: the drain waits for those, and this one never ends by itself.
        self._heartbeat_task = asyncio.get_running_loop().create_task(self._heartbeat(), name="heartbeat")
        log.info("gateway worker %s listening on %s:%d", self.name, self.config.host, self.port)
        if self.config.admin_port:
            router = Router()
            router.add("/metrics", lambda req: (200, {"content-type": MetricsRegistry.CONTENT_TYPE}, self.metrics.render()))
            router.add("/healthz", lambda req: (200, {"content-type": "text/plain"}, b"ok\n"))
            router.add("/readyz", lambda req: (200 if self.ready else 503, {"content-type": "text/plain"}, b"ready\n" if self.ready else b"not ready\n"))
            # Worker i of a pod serves admin_port + i, so each is scraped on its own.
            self.admin = HttpServer(router, self.config.host, self.config.admin_port + self.worker_index)
            await self.admin.start()

    @property
    def ready(self) -> bool:
        kafka_ok = not self.config.kafka_bootstrap or (self.producer.ready and self.relay.live)
        return not self.draining and self.subscriber.connected and kafka_ok and self.access.loaded

    def _on_relay_stalled(self, exc: Exception) -> None:
        # Rejoining did not help: drain (clients reconnect elsewhere) and exit
        # non-zero, so the supervisor or Kubernetes starts a fresh worker.
        log.error("the relay is stuck after its rejoins (%s): draining and exiting", exc)
        self.exit_code = 3
        # Not spawn(): the drain waits for the spawned tasks, and would wait for itself.
        asyncio.get_running_loop().create_task(self.drain(), name="drain")

    async def drain(self) -> None:
        """Graceful shutdown, bounded by drain_timeout_s; later calls wait for the first.

        Steps, each logged as `drain step N/7`:
        1. readiness off (/readyz answers 503), 2. stop accepting, 3. stop
        reading client frames and let posts in flight get their answer,
        4. close sockets with 1012 spread over drain_window_s (no reconnect
        stampede), 5. flush the producer, 6. commit and leave the consumer
        group, 7. close Redis.
        """
        if self.draining:
            await self.closed.wait()
            return
        self.draining = True
        try:
            await asyncio.wait_for(self._drain_steps(), self.config.drain_timeout_s)
        except asyncio.TimeoutError:
            log.error("drain took over %.0f s; closing what is left now", self.config.drain_timeout_s)
            for conn in list(self.connections):
                conn.end(CloseCode.DRAINING, "server restarting")
            await self.subscriber.aclose()
        finally:
            self.closed.set()

    async def _drain_steps(self) -> None:
        log.info("drain step 1/7: readiness off")
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        self.access.close()
        log.info("drain step 2/7: listener closed")
        if self.server is not None:
            self.server.close()
        log.info("drain step 3/7: reading paused on %d sockets; %d tasks in flight", len(self.connections), len(self._tasks))
        for conn in list(self.connections):
            conn.pause_reading()
        await self._wait_tasks(min(5.0, self.config.drain_timeout_s / 3))
        conns = list(self.connections)
        log.info("drain step 4/7: closing %d sockets with 1012 over %.1f s", len(conns), self.config.drain_window_s)
        tick_s = 0.05
        ticks = max(1, int(self.config.drain_window_s / tick_s))
        per_tick = max(1, -(-len(conns) // ticks))
        for start in range(0, len(conns), per_tick):
            for conn in conns[start : start + per_tick]:
                conn.end(CloseCode.DRAINING, "server restarting; reconnect with since", linger_s=2.0)
            if start + per_tick < len(conns):
                await asyncio.sleep(tick_s)
        log.info("drain step 5/7: flushing the producer")
        await self.producer.aclose()
        log.info("drain step 6/7: committing and leaving %s", self.relay.settings.group)
        await self.relay.aclose()
        log.info("drain step 7/7: closing redis")
        await self.subscriber.aclose()
        await self.publisher.aclose()
        if self.history is not None:
            await self.history.aclose()
        if self.admin is not None:
            await self.admin.aclose()
        log.info("drained")

    async def _heartbeat(self) -> None:
        """Every ping_interval_s, ping every socket; ping_timeout_s later drop
        those that sent nothing since (no pong, no frame). A dead peer gets no
        close frame: it could not read one. One sweep per worker instead of
        picows' ping task per connection."""
        interval = self.config.ping_interval_s
        timeout = min(self.config.ping_timeout_s, interval)
        while not self.draining:
            await asyncio.sleep(interval - timeout)
            await self._sweep(lambda conn: conn.ping())
            await asyncio.sleep(timeout)
            await self._sweep(self._drop_if_silent)

    async def _sweep(self, visit: Callable[[Connection], None]) -> None:
        for i, conn in enumerate(list(self.connections)):
            visit(conn)
            if i % 1000 == 999:
                await asyncio.sleep(0)  # a big sweep must not stall fan-out

    def _drop_if_silent(self, conn: Connection) -> None:
        if conn.awaiting_pong:
            self.m_dead.value += 1
            conn.drop()

    async def _wait_tasks(self, timeout_s: float) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    def spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- upgrade routing --------------------------------------------------------

    def route(self, request: WSUpgradeRequest) -> object:
        path, _, query = request.path.decode("latin-1").partition("?")
        if path == "/ws":
            return self._accept(request, query)
        if path == "/healthz":
            return _plain(200, b"ok\n")
        if path == "/readyz":
            return _plain(200, b"ready\n") if self.ready else _plain(503, b"not ready\n")
        if path == "/echo" and self.config.test_echo_route:
            return EchoListener(self.config.max_frame_bytes)
        return _plain(404, b"not found; the WebSocket endpoint is /ws\n")

    def _accept(self, request: WSUpgradeRequest, query: str) -> object:
        if self.draining:
            return _plain(503, b"draining; reconnect to another gateway\n")
        if len(self.connections) >= self.config.max_connections:
            return _plain(503, b"this gateway is full; retry later\n")
        # PROTOCOL.md 1: a token in the Authorization header or ?token=; in dev
        # mode ?user= names the user. A bad token is refused here, before any
        # WebSocket exists.
        try:
            identity = self.access.admit(request.headers, query)
        except AuthError as exc:
            return _plain(401, f"{exc}\n".encode())
        may_use = identity.may_use if identity.rooms is not None else _every_room
        session = Session(identity.user, self.name, self.limits, _new_msg_id, may_use, identity.exp, identity.issued_at)
        return Connection(self, session, self.config.max_frame_bytes)

    # ---- connections ---------------------------------------------------------------

    def connection_opened(self, conn: Connection) -> None:
        self.connections.add(conn)
        self.access.watch(conn)

    def connection_closed(self, conn: Connection) -> None:
        """Forget a socket: leave every room now, so nothing more is written to it."""
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        for room_id in conn.session.rooms:
            self._leave_room(room_id, conn)
        conn.session.rooms.clear()

    def connection_paused(self, conn: Connection) -> None:
        for room_id in conn.session.rooms:
            self.registry.set_writer(room_id, conn, conn.queue_write)

    def connection_resumed(self, conn: Connection) -> None:
        for room_id in conn.session.rooms:
            self.registry.set_writer(room_id, conn, conn.raw_write)

    @property
    def slow_consumers(self) -> int:
        return self.m_slow.value

    def slow_consumer(self, conn: Connection) -> None:
        self.m_slow.value += 1
        log.info("closing slow consumer %s (send buffer over %d bytes)", conn.session.user, self.config.send_buffer_limit_bytes)
        conn.end_slow(abort_after_s=SLOW_ABORT_S)

    # ---- actions from the session ---------------------------------------------------

    def perform(self, conn: Connection, actions: list[object]) -> None:
        for action in actions:
            kind = type(action)
            if kind is Post:
                self.spawn(self._post(conn, action))  # type: ignore[arg-type]
            elif kind is Reply:
                conn.send_text(action.payload)  # type: ignore[attr-defined]
            elif kind is JoinRoom:
                self._join(conn, action)  # type: ignore[arg-type]
            elif kind is LeaveRoom:
                self._leave_room(action.room, conn)  # type: ignore[attr-defined]
                conn.send_text(encode_left(action.room, action.reason))  # type: ignore[attr-defined]
            elif kind is CheckToken:
                self.access.refresh(conn, action.token)  # type: ignore[attr-defined]
            elif kind is Close:
                conn.end(action.code, action.reason)  # type: ignore[attr-defined]

    async def _post(self, conn: Connection, post: Post) -> None:
        record = post.record
        started = time.perf_counter()
        ok = await self.producer.post(record.room.encode(), encode_ingest(record))
        if ok:
            self.m_produce.observe(time.perf_counter() - started)
            self.m_posts.value += 1
            conn.send_text(encode_ack(record.client_msg_id))
        else:
            self.m_unavailable.value += 1
            conn.send_text(
                encode_error(ErrorCode.UNAVAILABLE, "message not accepted now; retry with the same client_msg_id", record.client_msg_id)
            )

    def _join(self, conn: Connection, join: JoinRoom) -> None:
        self.m_joins.value += 1
        room, first = self.registry.begin_join(join.room, conn)
        if first:
            self.subscriptions[join.room] = self.subscriber.subscribe(room.channel)
        if conn not in room.joining:
            # Already a member: answer again with where it stands.
            conn.send_text(encode_joined(room.id, room.last_seq))
            return
        confirmed = self.subscriptions[join.room]
        if confirmed.done() and self.history is None and join.since is None:
            # Fast path: nothing to wait for, no await between reading last_seq
            # and becoming live, so nothing can fall in between.
            self._complete_join(conn, room, room.last_seq, True, [], authoritative=False)
            return
        self.spawn(self._join_slow(conn, room, join.since, confirmed))

    async def _join_slow(self, conn: Connection, room: Room, since: int | None, confirmed: asyncio.Future[None]) -> None:
        # Subscribe first, then read history, then merge by seq (PITFALLS.md 2):
        # what is published after the confirmation is buffered for this socket,
        # what was published before it is in history.
        try:
            await asyncio.wait_for(asyncio.shield(confirmed), SUBSCRIBE_WAIT_S)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            log.warning("join of %s went ahead without a confirmed subscription", room.id)
        latest, recovered, replay, authoritative = room.last_seq, True, [], False
        if self.history is not None:
            try:
                latest, recovered, replay = await self._history_since(room.id, since)
                authoritative = True
            except Exception as exc:  # HistoryUnavailable, or a bad answer: the join goes on
                log.warning("history unavailable for a join: %s", exc)
                recovered = since is None or since >= room.last_seq
                if since is not None:
                    # The client holds everything up to `since`: never send it those again
                    # (a later fill of this room from an unknown position would).
                    latest = max(latest, since)
        elif since is not None and since < room.last_seq:
            recovered = False  # nothing to replay from
        if conn.closed or self.registry.rooms.get(room.id) is not room:
            return
        if conn not in room.joining:
            if room.has(conn):  # a repeated join raced the first one: answer it too
                conn.send_text(encode_joined(room.id, max(latest, room.last_seq)))
            return
        self._complete_join(conn, room, latest, recovered, replay, authoritative)

    async def _history_since(self, room_id: str, since: int | None) -> tuple[int, bool, list[tuple[int, bytes]]]:
        assert self.history is not None
        if since is None:
            latest, _ = await self.history.page(room_id, after=0, limit=1)  # every page carries latest_seq
            return latest, True, []
        latest, events = await self.history.page(room_id, after=since, limit=500)
        if since >= latest:
            return latest, True, []
        if latest - since > MAX_REPLAY or not events or events[0][0] != since + 1:
            return latest, False, []  # older than what is retained: reload over HTTP
        while events[-1][0] < latest:
            _, more = await self.history.page(room_id, after=events[-1][0], limit=500)
            if not more:
                break
            events.extend(more)
        return latest, True, [e for e in events if e[0] <= latest]

    def _complete_join(
        self, conn: Connection, room: Room, latest: int, recovered: bool, replay: list[tuple[int, bytes]], authoritative: bool
    ) -> None:
        conn.send_text(encode_joined(room.id, latest, recovered))
        sent_up_to = latest
        if replay:
            conn.write_frames(frame_events([payload for _, payload in replay]))
            sent_up_to = max(sent_up_to, replay[-1][0])
        writer = conn.queue_write if conn.paused else conn.raw_write
        pending = self.registry.complete_join(room, conn, writer, sent_up_to, authoritative)
        if pending:
            conn.write_frames(frame_events(pending))
        self._drain_registry()

    def _leave_room(self, room_id: str, conn: Connection) -> None:
        if self.registry.leave(room_id, conn):
            self.subscriptions.pop(room_id, None)
            self.subscriber.unsubscribe((ROOM_CHANNEL_PREFIX + room_id).encode())
        else:
            self._drain_registry()

    def _drain_registry(self) -> None:
        """Carry out what the registry queued: released deliveries, fill requests."""
        while self.registry.released:
            self._write(self.registry.released.pop(0))
        if self.registry.fill_requests:
            self._start_fills()

    # ---- fan-out ------------------------------------------------------------------------

    def on_redis_messages(self, batch: dict[bytes, list[bytes]]) -> None:
        """Every message of one Redis read, grouped by channel: frame once, write per socket."""
        started = time.perf_counter()
        by_channel = self.registry.by_channel
        deliver = self.registry.deliver
        for channel, payloads in batch.items():
            room = by_channel.get(channel)
            if room is None:
                if channel == _CONTROL_CHANNEL:
                    for payload in payloads:
                        self.access.on_control(payload)
                continue  # else: unsubscribed meanwhile
            delivery = deliver(room, payloads)
            if delivery is not None:
                self._write(delivery)
        self.m_fanout.observe(time.perf_counter() - started)
        if self.registry.released or self.registry.fill_requests:
            self._drain_registry()

    def _start_fills(self) -> None:
        for room in self.registry.fill_requests:
            self.spawn(self._fill(room))
        self.registry.fill_requests.clear()

    def _write(self, delivery: Delivery) -> None:
        buffer = delivery.buffer
        writers = delivery.room.writers  # a snapshot: a writer may close its socket
        for write in writers:
            write(buffer)
        extra = delivery.extra
        if extra:
            for write, data in extra:
                write(data)
        self.m_deliveries.value += delivery.count * (len(writers) + (len(extra) if extra else 0))
        self.m_batch.observe(delivery.count)

    def on_redis_connected(self, reconnected: bool) -> None:
        # Revocations published while we were away were missed too: read them all.
        self.spawn(self._load_revocations())
        if not reconnected:
            return
        # Anything published while the connection was down was missed
        # (PITFALLS.md 1): check every room against history.
        log.warning("redis subscriber reconnected; checking %d rooms for missed messages", len(self.registry.rooms))
        if self.history is None:
            return
        for room in list(self.registry.rooms.values()):
            if self.registry.begin_fill(room) is not None:
                self.spawn(self._fill(room))

    async def _fill(self, room: Room) -> None:
        """Fetch what the room missed after its last delivered seq, then deliver it with the held events."""
        assert self.history is not None
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + FILL_GIVE_UP_S
        events: list[tuple[int, bytes]] = []
        delay = 0.05
        async with self._fill_slots:
            # Live events must be flowing before history is read, or what is
            # published in between would fall in the crack.
            while not self.subscriber.is_confirmed(room.channel) and loop.time() < give_up_at:
                await asyncio.sleep(0.02)
            while loop.time() < give_up_at:
                if self.registry.rooms.get(room.id) is not room:
                    return  # everyone left meanwhile
                try:
                    after = room.last_seq
                    latest, page = await self.history.page(room.id, after=after, limit=500)
                    events = page
                    while events and events[-1][0] < latest and len(events) < MAX_REPLAY:
                        _, more = await self.history.page(room.id, after=events[-1][0], limit=500)
                        if not more:
                            break
                        events.extend(more)
                    break
                except HistoryUnavailable as exc:
                    log.warning("gap fill of %s failed, retrying: %s", room.id, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
            else:
                log.error("gap fill of %s gave up after %.0f s; delivering with the gap", room.id, FILL_GIVE_UP_S)
        if self.registry.rooms.get(room.id) is not room:
            return
        delivery = self.registry.finish_fill(room, events)
        if delivery is not None:
            self._write(delivery)

    async def _load_revocations(self) -> None:
        # Subscribed first, then read: a revocation published in between is
        # in the hash or on the channel, never in neither.
        deadline = time.monotonic() + SUBSCRIBE_WAIT_S
        while not self.subscriber.is_confirmed(_CONTROL_CHANNEL) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        try:
            stored = await self.publisher.hgetall(REVOKED_HASH)
        except Exception as exc:  # Redis down again: the next reconnect reads it
            log.warning("could not read the revocations: %r", exc)
            return
        self.access.load(stored)

    async def publish_events(self, records: list[tuple[bytes, bytes]]) -> None:
        """PUBLISH each (room key, event) on room:<id>, in order, in one round trip."""
        pipe = self.publisher.pipeline(transaction=False) if self._publish_command == "PUBLISH" else self.publisher.pipeline()
        command = self._publish_command
        for key, value in records:
            pipe.execute_command(command, ROOM_CHANNEL_PREFIX.encode() + key, value)
        await pipe.execute()


_CONTROL_CHANNEL = CONTROL_CHANNEL.encode()


def _plain(status: int, body: bytes) -> WSUpgradeResponseWithListener:
    if status >= 400:
        response = WSUpgradeResponse.create_error_response(status, body, {"Content-Type": "text/plain; charset=utf-8"})
    else:
        response = WSUpgradeResponse.create_ok_response(body)
    return WSUpgradeResponseWithListener(response, None)


def _service_token(config: GatewayConfig, worker_name: str) -> Callable[[], dict[str, str]] | None:
    """The headers of the gateway's own short-lived credential, per history request (jwt mode).

    A service token signed with service_key, which works whatever the user
    tokens' algorithm (RS256 leaves the gateway nothing to sign with); else
    one signed with jwt_secret (roomcast.auth.gateway_history_headers).
    Raises ConfigError, naming service_key, when there is neither.
    """
    return gateway_history_headers(config, worker_name)


def _every_room(room: str) -> bool:
    return True


def _new_msg_id() -> str:
    return "gw-" + uuid.uuid4().hex


# ---- processes ---------------------------------------------------------------------------


async def run_worker(config: GatewayConfig, worker_index: int = 0, on_ready: Callable[[GatewayApp], None] | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT, then drain; returns the exit code.

    A later signal (not the same stop arriving twice: roomcast.stopping)
    forces the exit.
    """
    app = GatewayApp(config, worker_index)
    loop = asyncio.get_running_loop()
    signals = StopSignals()

    def on_signal() -> None:
        action = signals.received(time.monotonic())
        if action is StopAction.DRAIN:
            loop.create_task(app.drain())
        elif action is StopAction.FORCE:
            log.warning("second signal: exiting without finishing the drain")
            os._exit(1)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await app.start()
    if on_ready is not None:
        on_ready(app)
    try:
        await app.closed.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    return app.exit_code


def _run_worker_process(config: GatewayConfig, worker_index: int) -> None:
    import uvloop

    def ready(app: GatewayApp) -> None:
        # Printed once Redis and Kafka are connected (or after a bound wait):
        # `roomcast dev` waits for one such line per worker.
        async def announce() -> None:
            deadline = time.monotonic() + READY_WAIT_S
            while not app.ready and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if not app.ready:
                log.warning("worker %d listening, but redis or kafka is not connected yet", worker_index)
            print(f"gateway worker {worker_index} ready port={app.port}", flush=True)

        app.spawn(announce())

    async def main() -> int:
        return await run_worker(config, worker_index, ready)

    try:
        code = uvloop.run(main())
    except KeyboardInterrupt:
        code = 0
    if code:
        sys.exit(code)


def serve(config: GatewayConfig, worker_index: int | None = None) -> None:
    """Run the gateway: one worker in this process, or a supervisor of `workers` processes.

    The supervisor restarts a worker that dies and forwards SIGTERM/SIGINT to
    all of them (each drains on its own).
    """
    if worker_index is not None or config.workers == 1:
        _run_worker_process(config, worker_index or 0)
        return
    procs: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    # The config goes to the workers in their environment, never as flags:
    # `ps` shows every process's command line to every local user.
    env = dict(os.environ, **to_environ(config))
    env[env_name(GatewayConfig, "workers")] = "1"

    def spawn(i: int) -> None:
        procs[i] = subprocess.Popen([sys.executable, "-m", "roomcast.cli", "gateway", "--worker-index", str(i)], env=env)

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for i in range(config.workers):
        spawn(i)
    while True:
        time.sleep(0.2)
        if stopping:
            if all(p.poll() is not None for p in procs.values()):
                return
            continue
        for i, p in list(procs.items()):
            if p.poll() is not None:
                log.warning("gateway worker %d exited with %s; restarting it", i, p.returncode)
                time.sleep(0.5)
                spawn(i)
