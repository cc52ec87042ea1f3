"""The gateway's Kafka side: the ingest producer and the message.created relay.

Both start in the background and keep retrying while the broker is
unreachable: the gateway still serves joins and Redis fan-out, and answers
posts with `unavailable` (never an ack for something not stored).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from roomcast.config import GATEWAY_TIMINGS
from roomcast.kafka.clients import Retry, start_with_retry
from roomcast.kafka.consumer import GroupConsumer, MemberSettings
from roomcast.kafka.membership import ConsumerStalled
from roomcast.kafka.offsets import Fetched
from roomcast.wire.events import CREATED_TOPIC, GATEWAY_GROUP, INGEST_TOPIC

__all__ = ["IngestProducer", "CreatedRelay"]

log = logging.getLogger("roomcast.gateway.kafka")

# While the broker is away the gateway keeps serving joins and fan-out; it
# tries again at most every 5 s.
CONNECT_RETRY = Retry(0.1, 5.0)


class IngestProducer:
    """Produces posts to message.ingest (key = room, acks=all, small linger)."""

    def __init__(self, bootstrap: str, *, linger_ms: int, timeout_ms: int, client_id: str, idempotent: bool = True) -> None:
        self.bootstrap = bootstrap
        self.idempotent = idempotent
        self.linger_ms = linger_ms
        self.timeout_s = timeout_ms / 1000
        self.client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()

    @property
    def ready(self) -> bool:
        return self._producer is not None

    async def start(self) -> None:
        """Begin connecting in the background. Idempotent."""
        if self._task is None and self.bootstrap:
            self._task = asyncio.get_running_loop().create_task(self._connect(), name="ingest-producer")

    async def _connect(self) -> None:
        producer = await start_with_retry(
            lambda: AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                client_id=self.client_id,
                acks="all",
                linger_ms=self.linger_ms,
                enable_idempotence=self.idempotent,  # not on the embedded broker: it has no InitProducerId
                request_timeout_ms=max(1000, int(self.timeout_s * 1000)),
                retry_backoff_ms=50,
            ),
            lambda producer: producer.start(),
            self._closing,
            what="the ingest producer", bootstrap=self.bootstrap, retry=CONNECT_RETRY,
        )
        if producer is not None:
            self._producer = producer
            log.info("ingest producer connected to %s", self.bootstrap)

    async def post(self, key: bytes, value: bytes) -> bool:
        """Produce one record and wait for the broker's ack. False: not accepted now."""
        producer = self._producer
        if producer is None:
            return False
        try:
            await asyncio.wait_for(producer.send_and_wait(INGEST_TOPIC, value=value, key=key), self.timeout_s)
            return True
        except (KafkaError, asyncio.TimeoutError, OSError) as exc:
            log.warning("post not accepted by kafka: %r", exc)
            return False

    async def aclose(self) -> None:
        """Flush what is queued and close. Idempotent."""
        self._closing.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await asyncio.wait_for(producer.stop(), self.timeout_s)
            except Exception:
                log.exception("closing the ingest producer failed")


Publish = Callable[[list[tuple[bytes, bytes]]], Awaitable[None]]



class CreatedRelay(GroupConsumer):
    """Reads message.created in group realtime-gateway-group and PUBLISHes each event.

    One ordered pipeline: a batch's records are published in partition order,
    then its offsets are committed; a failed publish fetches the batch again,
    so nothing is skipped. Redeliveries are dropped by seq at every gateway.
    Membership, liveness and rebalances are roomcast.kafka.consumer's; when
    rejoining did not help, `on_stalled` is called (the worker exits non-zero
    so its supervisor starts a fresh one).
    """

    # A PUBLISH to a Redis that is away, a commit refused: fetch the batch again.
    retriable = (Exception,)

    def __init__(
        self,
        bootstrap: str,
        publish: Publish,
        *,
        fetch_max_wait_ms: int,
        client_id: str,
        group_id: str = GATEWAY_GROUP,
        session_timeout_ms: int = 6000,
        static_membership: bool = False,
        max_records: int = 1000,
        on_stalled: Callable[[ConsumerStalled], None] | None = None,
    ) -> None:
        super().__init__(
            "the message.created relay",
            MemberSettings(
                bootstrap=bootstrap,
                group=group_id,
                topic=CREATED_TOPIC,
                client_id=client_id,
                member_name=client_id,
                session_timeout_ms=session_timeout_ms,
                # A batch takes milliseconds and its revocation waits at most
                # GATEWAY_TIMINGS.relay_revoke_grace_s: a member not back within a session is gone.
                rebalance_timeout_ms=session_timeout_ms,
                heartbeat_interval_ms=max(300, session_timeout_ms // 6),
                fetch_max_wait_ms=fetch_max_wait_ms,
                max_records=max_records,
                static=static_membership,
                revoke_grace_s=GATEWAY_TIMINGS.relay_revoke_grace_s,
                retry=CONNECT_RETRY,
                connect_retry=CONNECT_RETRY,
            ),
        )
        self.publish = publish
        self.on_stalled = on_stalled
        self.published = 0
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()

    async def start(self) -> None:
        """Join in the background (the worker serves joins and fan-out meanwhile). Idempotent."""
        if self._task is None and self.settings.bootstrap:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="created-relay")

    async def _run(self) -> None:
        try:
            await self.run(self._closing)
        except ConsumerStalled as exc:
            log.error("%s; giving up", exc)
            if self.on_stalled is not None:
                self.on_stalled(exc)

    async def handle(self, consumer: AIOKafkaConsumer, batch: Fetched, epoch: int) -> None:
        # One PUBLISH pipeline and one commit for the whole fetch: each
        # partition's records stay in order inside the pipeline, and a commit
        # per partition would cost a broker round trip each.
        records = [(r.key or b"", r.value or b"") for rs in batch.values() for r in rs]
        await asyncio.wait_for(self.publish(records), GATEWAY_TIMINGS.relay_step_timeout_s)
        self.published += len(records)
        if epoch != self.epoch:
            return  # revoked meanwhile: the new owner relays these again (dropped by seq)
        self.commit_later(consumer, {tp: rs[-1].offset + 1 for tp, rs in batch.items()})

    async def aclose(self) -> None:
        """Finish the in-flight batch, commit, leave the group. Idempotent."""
        self._closing.set()
        if self._task is not None:
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                log.exception("the relay ended with an error")
            self._task = None
