"""One gateway worker process: builds the hub and the adapters, starts them, reports readiness, drains.

The worker owns the lifecycle (start, readiness, the numbered drain), the
heartbeat, the upgrade routing (auth included) and the worker-level
metrics. What happens between sockets, Redis and Kafka is the hub's
(gateway/hub.py); worker processes are the supervisor's (gateway/supervisor.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable

from picows import WSUpgradeRequest, WSUpgradeResponse, WSUpgradeResponseWithListener, ws_create_server

from gateway.access import AccessGuard
from gateway.adapters.history import HistoryClient
from gateway.adapters.kafka import CreatedRelay, IngestProducer
from gateway.adapters.message_listener import EchoListener, make_server_kwargs
from gateway.adapters.redis_cluster import ClusterSubscriber
from gateway.adapters.redis_pub import RedisPublisher
from gateway.adapters.redis_sub import RedisSubscriber
from gateway.adapters.websocket import Connection
from gateway.core.rooms import RoomRegistry
from gateway.core.session import Session, SessionLimits
from gateway.hub import Hub
from roomcast.auth import AuthError, Authenticator
from roomcast.service_auth import gateway_history_headers
from roomcast.config import GATEWAY_TIMINGS, GatewayConfig, broker_profile, gateway_id
from roomcast.http import HttpServer, Router
from roomcast.metrics import MetricsRegistry
from roomcast.stopping import StopAction, StopSignals
from roomcast.wire.codes import CloseCode
from roomcast.wire.control import CONTROL_CHANNEL

__all__ = ["GatewayWorker", "run_worker", "run_worker_process"]

log = logging.getLogger("roomcast.gateway")


class GatewayWorker:
    """The adapters, the hub and the lifecycle of one worker process."""

    def __init__(self, config: GatewayConfig, worker_index: int = 0) -> None:
        self.config = config
        self.worker_index = worker_index
        self.name = f"{gateway_id(config)}-{worker_index}"
        self.metrics = MetricsRegistry()
        self.limits = SessionLimits(
            max_body_bytes=config.max_body_bytes,
            send_rate_per_s=config.send_rate_per_s,
            send_burst=config.send_burst,
            abuse_max_errors=config.abuse_max_errors,
            abuse_window_ms=config.abuse_window_ms,
        )
        self.publisher = RedisPublisher(config.redis_url, cluster=config.redis_mode == "cluster")
        self.producer = IngestProducer(
            config.kafka_bootstrap,
            linger_ms=config.produce_linger_ms,
            timeout_ms=config.produce_timeout_ms,
            client_id=self.name,
            idempotent=broker_profile(config).idempotent_producer,
        )
        self.history = HistoryClient(
            config.history_url,
            pool_size=config.history_pool_size,
            timeout_s=config.history_timeout_s,
            connect_timeout_s=config.history_connect_timeout_s,
            keepalive_s=config.history_keepalive_s,
            headers=_service_token(config, self.name),
        ) if config.history_url else None
        self.hub = Hub(
            config, producer=self.producer, history=self.history, revocations=self.publisher.revocations, metrics=self.metrics
        )
        self.subscriber: RedisSubscriber | ClusterSubscriber
        if config.redis_mode == "cluster":
            # Sharded pub/sub: SSUBSCRIBE on each slot's node, SPUBLISH to it.
            self.subscriber = ClusterSubscriber(config.redis_url, self.hub.on_redis_messages, self.hub.on_redis_connected)
        else:
            self.subscriber = RedisSubscriber(config.redis_url, self.hub.on_redis_messages, self.hub.on_redis_connected)
        self.access = AccessGuard(Authenticator.from_config(config), self.hub.perform, lambda: self.hub.connections)
        self.hub.attach(self.subscriber, self.access)
        self.relay = CreatedRelay(
            config.kafka_bootstrap,
            self.publisher.publish_events,
            fetch_max_wait_ms=broker_profile(config).fetch_max_wait_ms,
            client_id=self.name,
            session_timeout_ms=config.kafka_session_timeout_ms,
            # Static membership: a restarted worker takes its partitions back
            # without a rebalance (real Kafka; the embedded broker cannot).
            static_membership=config.kafka_static_membership,
            on_stalled=self._on_relay_stalled,
        )
        self.exit_code = 0
        self.server: asyncio.Server | None = None
        self.draining = False
        self.closed = asyncio.Event()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self.port = 0
        self.admin: HttpServer | None = None
        self._init_metrics()

    @property
    def connections(self) -> set[Connection]:
        return self.hub.connections

    @property
    def registry(self) -> RoomRegistry:
        return self.hub.registry

    def _init_metrics(self) -> None:
        m = self.metrics
        m.gauge("roomcast_gateway_ready", "1 when ready: Redis and Kafka connected, revocations read, not draining", lambda: int(self.ready))
        self.m_dead = m.counter("roomcast_gateway_dead_peer_drops_total", "sockets dropped for not answering a ping")
        m.counter_fn("roomcast_gateway_redis_reconnects_total", "Redis subscriber reconnects", lambda: self.subscriber.reconnects)
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
        self.subscriber.subscribe(CONTROL_CHANNEL.encode())  # revocations (gateway/access.py)
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
        # Not among the hub's tasks: the drain waits for those, and this one never ends by itself.
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
        # Not the hub's spawn(): the drain waits for those tasks, and would wait for itself.
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
            for conn in list(self.hub.connections):
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
        log.info("drain step 3/7: reading paused on %d sockets", len(self.hub.connections))
        for conn in list(self.hub.connections):
            conn.pause_reading()
        await self.hub.wait_tasks(min(5.0, self.config.drain_timeout_s / 3))
        conns = list(self.hub.connections)
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
        for i, conn in enumerate(list(self.hub.connections)):
            visit(conn)
            if i % 1000 == 999:
                await asyncio.sleep(0)  # a big sweep must not stall fan-out

    def _drop_if_silent(self, conn: Connection) -> None:
        if conn.awaiting_pong:
            self.m_dead.value += 1
            conn.drop()

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
        if len(self.hub.connections) >= self.config.max_connections:
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
        return Connection(self.hub, session, self.config.max_frame_bytes)


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
    one signed with jwt_secret (roomcast.service_auth.gateway_history_headers).
    Raises ConfigError, naming service_key, when there is neither.
    """
    return gateway_history_headers(config, worker_name)


def _every_room(room: str) -> bool:
    return True


def _new_msg_id() -> str:
    return "gw-" + uuid.uuid4().hex


# ---- processes ---------------------------------------------------------------------------


async def run_worker(config: GatewayConfig, worker_index: int = 0, on_ready: Callable[[GatewayWorker], None] | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT, then drain; returns the exit code.

    A later signal (not the same stop arriving twice: roomcast.stopping)
    forces the exit.
    """
    app = GatewayWorker(config, worker_index)
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


def run_worker_process(config: GatewayConfig, worker_index: int) -> None:
    import uvloop

    def ready(app: GatewayWorker) -> None:
        # Printed once Redis and Kafka are connected (or after a bound wait):
        # `roomcast dev` waits for one such line per worker.
        async def announce() -> None:
            deadline = time.monotonic() + GATEWAY_TIMINGS.ready_wait_s
            while not app.ready and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if not app.ready:
                log.warning("worker %d listening, but redis or kafka is not connected yet", worker_index)
            print(f"gateway worker {worker_index} ready port={app.port}", flush=True)

        app.hub.spawn(announce())

    async def main() -> int:
        return await run_worker(config, worker_index, ready)

    try:
        code = uvloop.run(main())
    except KeyboardInterrupt:
        code = 0
    if code:
        sys.exit(code)
