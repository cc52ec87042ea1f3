"""Kafka helpers shared by the gateway and the chat service: topic set-up, contiguous fetches."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from roomcast.offsets import OffsetGapGuard
from roomcast.wire.events import CREATED_TOPIC, INGEST_TOPIC

__all__ = ["contiguous", "ensure_topics"]

Fetched = dict[TopicPartition, list[ConsumerRecord[Any, Any]]]  # what getmany() returns

# How long a consumer pauses before fetching again a partition held back at a hole.
_HOLE_RETRY_S = 0.005

log = logging.getLogger("roomcast.kafka")


async def ensure_topics(bootstrap: str, partitions: int, timeout_s: float = 15.0) -> None:
    """Create message.ingest and message.created with `partitions` partitions if missing.

    The embedded broker auto-creates topics with 4 partitions on first use, so
    the dev stack and tests create them explicitly first. In production the
    topics are declared (k8s KafkaTopic) and this is not called.
    """
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    await asyncio.wait_for(admin.start(), timeout_s)
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(name, num_partitions=partitions, replication_factor=1)
            for name in (INGEST_TOPIC, CREATED_TOPIC)
            if name not in existing
        ]
        if wanted:
            try:
                await admin.create_topics(wanted)
            except TopicAlreadyExistsError:
                pass
            log.info("created topics %s with %d partitions", [t.name for t in wanted], partitions)
    finally:
        await admin.close()


async def contiguous(consumer: AIOKafkaConsumer, guard: OffsetGapGuard, batch: Fetched) -> Fetched:
    """The records of a getmany() result that `guard` admits (roomcast.offsets says why).

    A partition held back at a hole is sought back to it, so its records are
    fetched again once the hole has filled. A partition seen for the first
    time since its assignment starts from its committed offset.
    """
    now = time.monotonic()
    admitted: Fetched = {}
    held = False
    for tp, records in batch.items():
        if not guard.knows(tp):
            guard.expect(tp, await _committed(consumer, tp))
        admission = guard.admit(tp, [r.offset for r in records], now)
        if admission.refetch_from is not None:
            held = True
            if tp in consumer.assignment():
                consumer.seek(tp, admission.refetch_from)
        if admission.keep > admission.skip:
            admitted[tp] = records[admission.skip : admission.keep]
    if held and not admitted:
        await asyncio.sleep(_HOLE_RETRY_S)
    return admitted


async def _committed(consumer: AIOKafkaConsumer, tp: TopicPartition) -> int | None:
    try:
        return await consumer.committed(tp)
    except KafkaError as exc:
        log.debug("committed offset of %s unknown (%s)", tp, exc)
        return None
