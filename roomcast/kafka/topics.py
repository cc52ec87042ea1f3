"""The topics of the contract, created where nobody declared them (dev stack, tests)."""

from __future__ import annotations

import asyncio
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from roomcast.wire.events import CREATED_TOPIC, INGEST_TOPIC

__all__ = ["ensure_topics"]

log = logging.getLogger("roomcast.kafka.topics")


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
