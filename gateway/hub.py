"""The glue of a gateway worker: joins, posts, fan-out and gap fills.

The hub receives what the sockets' sessions decided (`perform`) and what
Redis delivered (`on_redis_messages`), and answers through the adapters it
is given: the WebSocket connections, the Redis subscriber, the ingest
producer, the history client. It opens no socket and sends no Redis or
Kafka command of its own. It is the `ConnectionEvents` of every socket
(gateway/adapters/websocket.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

from gateway.adapters.history import HistoryClient, HistoryUnavailable
from gateway.adapters.kafka import IngestProducer
from gateway.adapters.websocket import Connection
from gateway.core.rooms import Delivery, Room, RoomRegistry, frame_events
from gateway.core.session import CheckToken, Close, JoinRoom, LeaveRoom, Post, Reply
from roomcast.config import GATEWAY_TIMINGS, GatewayConfig
from roomcast.metrics import SIZE_BUCKETS, MetricsRegistry
from roomcast.wire.codes import ErrorCode
from roomcast.wire.control import CONTROL_CHANNEL
from roomcast.wire.events import encode_ingest, room_channel
from roomcast.wire.frames import encode_ack, encode_error, encode_joined, encode_left

if TYPE_CHECKING:
    from gateway.access import AccessGuard
    from gateway.adapters.redis_cluster import ClusterSubscriber
    from gateway.adapters.redis_sub import RedisSubscriber

__all__ = ["Hub"]

log = logging.getLogger("roomcast.gateway")

_CONTROL_CHANNEL = CONTROL_CHANNEL.encode()


class Hub:
    """Joins, posts, fan-out and fills of one worker. Call `attach` before the first socket."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        producer: IngestProducer,
        history: HistoryClient | None,
        revocations: Callable[[], Awaitable[Mapping[bytes, bytes]]],
        metrics: MetricsRegistry,
    ) -> None:
        self.config = config
        self.registry = RoomRegistry(fill_gaps=history is not None)
        self.producer = producer
        self.history = history
        self.revocations = revocations
        self.connections: set[Connection] = set()
        # Sockets whose kernel send buffer is full: their frames queue here.
        self.paused: set[Connection] = set()
        self.subscriptions: dict[str, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._fill_slots = asyncio.Semaphore(GATEWAY_TIMINGS.fill_concurrency)
        self._init_metrics(metrics)

    def attach(self, subscriber: RedisSubscriber | ClusterSubscriber, access: AccessGuard) -> None:
        """The adapters built around the hub (they call back into it)."""
        self.subscriber = subscriber
        self.access = access

    def _init_metrics(self, m: MetricsRegistry) -> None:
        stats = self.registry.stats
        m.gauge("roomcast_gateway_connections", "open client WebSockets", lambda: len(self.connections))
        m.gauge("roomcast_gateway_rooms", "rooms with a local socket (one Redis subscription each)", lambda: len(self.registry.rooms))
        self.m_joins = m.counter("roomcast_gateway_joins_total", "joins accepted")
        self.m_deliveries = m.counter("roomcast_gateway_deliveries_total", "messages written to sockets (message x socket)")
        self.m_batch = m.histogram("roomcast_gateway_fanout_batch_events", "events framed into one buffer per room per Redis read", SIZE_BUCKETS)
        self.m_fanout = m.histogram("roomcast_gateway_fanout_latency_seconds", "time to frame and write one Redis read to every socket")
        self.m_slow = m.counter("roomcast_gateway_slow_consumer_closes_total", "sockets closed with 4000")
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

    # ---- tasks ------------------------------------------------------------------

    async def wait_tasks(self, timeout_s: float) -> None:
        """Wait (bounded) for the posts, joins and fills in flight."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)

    def spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- connections ---------------------------------------------------------------

    def connection_opened(self, conn: Connection) -> None:
        self.connections.add(conn)
        self.access.watch(conn)

    def connection_closed(self, conn: Connection) -> None:
        """Forget a socket: leave every room now, so nothing more is written to it."""
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        self.paused.discard(conn)
        for room_id in conn.session.rooms:
            self._leave_room(room_id, conn)
        conn.session.rooms.clear()

    def connection_paused(self, conn: Connection) -> None:
        self.paused.add(conn)
        for room_id in conn.session.rooms:
            self.registry.set_writer(room_id, conn, conn.queue_write)

    def connection_resumed(self, conn: Connection) -> None:
        self.paused.discard(conn)
        for room_id in conn.session.rooms:
            self.registry.set_writer(room_id, conn, conn.raw_write)

    @property
    def slow_consumers(self) -> int:
        return self.m_slow.value

    def _cut_slow_consumers(self) -> None:
        """Close with 4000 every paused socket whose queue passed send_buffer_limit_bytes.

        Called after every write the hub makes: a queue only grows then. The
        paused sockets are few, so this costs nothing while all keep up.
        """
        limit = self.config.send_buffer_limit_bytes
        for conn in [c for c in self.paused if c.pending_bytes > limit]:
            self.paused.discard(conn)
            self.m_slow.value += 1
            log.info("closing slow consumer %s (send buffer over %d bytes)", conn.session.user, limit)
            conn.end_slow(abort_after_s=GATEWAY_TIMINGS.slow_abort_s)

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
        if self.paused:
            self._cut_slow_consumers()

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
        # Subscribe first, then read history, then merge by seq (the other order loses what is published in between):
        # what is published after the confirmation is buffered for this socket,
        # what was published before it is in history.
        try:
            await asyncio.wait_for(asyncio.shield(confirmed), GATEWAY_TIMINGS.subscribe_wait_s)
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
        if latest - since > GATEWAY_TIMINGS.max_replay or not events or events[0][0] != since + 1:
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
        self.registry.complete_join(room, conn, writer, sent_up_to, authoritative)
        self._drain_registry()

    def _leave_room(self, room_id: str, conn: Connection) -> None:
        if self.registry.leave(room_id, conn):
            self.subscriptions.pop(room_id, None)
            self.subscriber.unsubscribe(room_channel(room_id).encode())
        else:
            self._drain_registry()

    def _drain_registry(self) -> None:
        """Carry out what the registry queued, in order: deliveries to write, then fills to start."""
        registry = self.registry
        while registry.outbox:
            # Swapped out first: a write can close a socket, whose leave may queue more.
            outbox, registry.outbox = registry.outbox, []
            for delivery in outbox:
                self._write(delivery)
        if registry.fill_requests:
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
            deliver(room, payloads)
        self._drain_registry()
        self.m_fanout.observe(time.perf_counter() - started)

    def _start_fills(self) -> None:
        for room in self.registry.fill_requests:
            self.spawn(self._fill(room))
        self.registry.fill_requests.clear()

    def _write(self, delivery: Delivery) -> None:
        buffer = delivery.buffer
        writers = delivery.room.writers if delivery.members else ()  # a snapshot: a writer may close its socket
        for write in writers:
            write(buffer)
        extra = delivery.extra
        if extra:
            for write, data in extra:
                write(data)
        self.m_deliveries.value += delivery.count * (len(writers) + (len(extra) if extra else 0))
        self.m_batch.observe(delivery.count)
        if self.paused:
            self._cut_slow_consumers()

    def on_redis_connected(self, reconnected: bool) -> None:
        # Revocations published while we were away were missed too: read them all.
        self.spawn(self._load_revocations())
        if not reconnected:
            return
        # Anything published while the connection was down was missed
        # (Redis pub/sub keeps nothing for an absent subscriber): check every room against history.
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
        give_up_at = loop.time() + GATEWAY_TIMINGS.fill_give_up_s
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
                    while events and events[-1][0] < latest and len(events) < GATEWAY_TIMINGS.max_replay:
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
                log.error("gap fill of %s gave up after %.0f s; delivering with the gap", room.id, GATEWAY_TIMINGS.fill_give_up_s)
        if self.registry.rooms.get(room.id) is not room:
            return
        self.registry.finish_fill(room, events)
        self._drain_registry()

    async def _load_revocations(self) -> None:
        # Subscribed first, then read: a revocation published in between is
        # in the hash or on the channel, never in neither.
        deadline = time.monotonic() + GATEWAY_TIMINGS.subscribe_wait_s
        while not self.subscriber.is_confirmed(_CONTROL_CHANNEL) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        try:
            stored = await self.revocations()
        except Exception as exc:  # Redis down again: the next reconnect reads it
            log.warning("could not read the revocations: %r", exc)
            return
        self.access.load(stored)
