"""Offsets of a consumer: contiguous fetches, committed offsets, lag, unowned partitions.

Each reads without waiting long: a member that waits on the broker inside a
batch never rejoins a rebalance.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from roomcast.offsets import OffsetGapGuard

__all__ = ["OffsetUnknown", "committed_offset", "consumer_lag", "contiguous", "unowned_offsets"]

Fetched = dict[TopicPartition, list[ConsumerRecord[Any, Any]]]  # what getmany() returns

# How long a consumer pauses before fetching again a partition held back at a hole.
_HOLE_RETRY_S = 0.005

log = logging.getLogger("roomcast.kafka.offsets")


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
            try:
                guard.expect(tp, await committed_offset(consumer, tp))
            except OffsetUnknown as exc:
                # Where the partition starts is unknown: guessing from this fetch
                # could step over a hole, so fetch it again once the broker answers.
                log.info("%s; fetching the partition again", exc)
                held = True
                if tp in consumer.assignment():
                    consumer.seek(tp, records[0].offset)
                continue
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


class OffsetUnknown(Exception):
    """The group's committed offset could not be read now (broker away or frozen)."""


async def committed_offset(consumer: AIOKafkaConsumer, tp: TopicPartition, timeout_s: float = 2.0) -> int | None:
    """The group's committed offset of tp; None when the group has committed none.

    Bounded: aiokafka retries a retriable error here forever, and a member
    that waits on it inside a batch never rejoins a rebalance. Raises
    OffsetUnknown when the broker did not answer in time.
    """
    try:
        return await asyncio.wait_for(consumer.committed(tp), timeout_s)
    except (KafkaError, asyncio.TimeoutError) as exc:
        raise OffsetUnknown(f"committed offset of {tp} unknown ({exc!r})") from exc


def consumer_lag(consumer: AIOKafkaConsumer, handed_out: dict[TopicPartition, int]) -> int:
    """Records on the consumer's assigned partitions that it has not handed out yet.

    highwater() minus the position (ListOffsets(latest) is wrong on the
    embedded broker). The position is aiokafka's own where it is valid
    (reading it through position() could wait for an offset reset), else the
    next offset after what getmany handed out (`handed_out`); a partition
    with neither counts 0. Never raises, never waits.
    """
    try:
        assignment = consumer._subscription.subscription.assignment  # noqa: SLF001
    except AttributeError:
        assignment = None
    total = 0
    for tp in consumer.assignment():
        high = consumer.highwater(tp)
        if high is None:
            continue
        position = handed_out.get(tp)
        try:
            state = assignment.state_value(tp) if assignment is not None else None
            if state is not None and state.has_valid_position:
                position = max(position or 0, state.position)
        except (AttributeError, KeyError):
            pass
        if position is not None:
            total += max(0, high - position)
    return total


async def unowned_offsets(consumer: AIOKafkaConsumer, topic: str, timeout_s: float = 2.0) -> dict[int, tuple[int | None, int]]:
    """partition -> (the group's committed offset, the end offset) of each partition of topic
    this member does not own. Empty when the broker does not answer in time."""
    partitions = consumer.partitions_for_topic(topic) or set()
    owned = {tp.partition for tp in consumer.assignment()}
    others = [TopicPartition(topic, p) for p in sorted(partitions) if p not in owned]
    if not others:
        return {}
    try:
        ends = await asyncio.wait_for(consumer.end_offsets(others), timeout_s)
        committed = {tp: await committed_offset(consumer, tp, timeout_s) for tp in others}
    except (KafkaError, OffsetUnknown, asyncio.TimeoutError) as exc:
        log.debug("offsets of %s's other partitions unknown (%r)", topic, exc)
        return {}
    return {tp.partition: (committed[tp], ends[tp]) for tp in others}
