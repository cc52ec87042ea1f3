"""roomcast.kafka against the real embedded broker: the group-member base both services are built on,
topic creation, and the lag it reports."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from roomcast.kafka import ensure_topics
from roomcast.kafka.consumer import GroupConsumer, MemberSettings
from roomcast.kafka.offsets import Fetched
from roomcast.wire.events import CREATED_TOPIC
from tests.support import scaled


class Recorder(GroupConsumer):
    """Keeps every record in the order it was handed; fails the first `failures` batches."""

    retriable = (RuntimeError,)

    def __init__(self, bootstrap: str, group: str, failures: int = 0) -> None:
        super().__init__(
            "a test member",
            MemberSettings(
                bootstrap=bootstrap, group=group, topic=CREATED_TOPIC, client_id=group, member_name=group,
                session_timeout_ms=6000, rebalance_timeout_ms=6000, heartbeat_interval_ms=1000,
                fetch_max_wait_ms=10, max_records=7,
            ),
        )
        self.failures = failures
        self.seen: dict[int, list[bytes]] = {}

    async def handle(self, consumer: AIOKafkaConsumer, batch: Fetched, epoch: int) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("the downstream is away")
        for tp, records in batch.items():
            self.seen.setdefault(tp.partition, []).extend(r.value or b"" for r in records)
        if epoch == self.epoch:
            await consumer.commit({tp: rs[-1].offset + 1 for tp, rs in batch.items()})


async def produce(bootstrap: str, count: int, tag: str = "m") -> dict[int, list[bytes]]:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    sent: dict[int, list[bytes]] = {}
    try:
        for n in range(count):
            meta = await producer.send_and_wait(CREATED_TOPIC, f"{tag}{n}".encode(), key=f"k{n % 5}".encode())
            sent.setdefault(meta.partition, []).append(f"{tag}{n}".encode())
    finally:
        await producer.stop()
    return sent


async def run_until(member: Recorder, done: object, timeout_s: float) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(member.run(stop))
    deadline = asyncio.get_running_loop().time() + scaled(timeout_s)
    try:
        while not done():  # type: ignore[operator]
            assert not task.done(), task
            assert asyncio.get_running_loop().time() < deadline, f"seen {member.seen}"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(task, scaled(20))


async def test_every_record_is_handed_once_in_partition_order_and_failures_fetch_the_batch_again(kafka_bootstrap: str) -> None:
    await ensure_topics(kafka_bootstrap, 2)
    await ensure_topics(kafka_bootstrap, 2)  # idempotent
    sent = await produce(kafka_bootstrap, 60)
    member = Recorder(kafka_bootstrap, "test-member-order", failures=3)
    await run_until(member, lambda: sum(map(len, member.seen.values())) >= 60, 30)
    assert member.seen == sent  # in order, none skipped by the three failed batches, none twice
    assert member.retries == 3 and member.lag() == 0
    assert member.consumer is None and not member.in_group  # left the group at stop


async def test_a_second_run_starts_from_the_commits(kafka_bootstrap: str) -> None:
    await ensure_topics(kafka_bootstrap, 2)
    earlier = await produce(kafka_bootstrap, 10)
    first = Recorder(kafka_bootstrap, "test-member-resume")
    await run_until(first, lambda: first.seen == earlier, 30)
    later = await produce(kafka_bootstrap, 10, tag="later-")
    second = Recorder(kafka_bootstrap, "test-member-resume")
    await run_until(second, lambda: sum(map(len, second.seen.values())) >= 10, 30)
    assert second.seen == later  # nothing of the first run again: it committed
