"""How the embedded broker's fetch cost grows with its log.

    python -m bench.tansu_fetch_cost [--sizes 100,1000,5000,20000]

Starts a fresh Tansu broker, fills partition 0 of a topic with single-record
batches (what a linger-0 producer writes at a paced rate), and times a fetch
at the end of the log after each size; then the same number of records in
batches of 10, and a fetch of a small partition next to the big one. Tansu
0.6 keeps each produced batch as one object of its in-memory store and a
fetch walks all of a partition's objects, so the cost grows with the
partition's batch count (not its record count, nor the other partitions'),
and it has neither retention nor DeleteRecords to bound it. This is why the
Kafka-hop budget holds in the first seconds of a run and is then missed
(PERFORMANCE.md, "Hops").
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from roomcast.embedded import start_tansu

TOPIC = "fetch-cost"


async def _fetch_ms(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int, repeats: int = 20) -> float:
    times = []
    for _ in range(repeats):
        consumer.seek(tp, offset)
        started = time.perf_counter()
        got = await consumer.getmany(tp, timeout_ms=1000)
        times.append((time.perf_counter() - started) * 1000)
        if not got:
            raise RuntimeError(f"no record at {tp}@{offset}")
    return statistics.median(times)


async def measure(sizes: list[int]) -> list[tuple[str, int, float]]:
    broker = start_tansu()
    rows: list[tuple[str, int, float]] = []
    try:
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.address)
        await admin.start()
        await admin.create_topics([NewTopic(TOPIC, num_partitions=3, replication_factor=1)])
        await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=broker.address, acks="all", linger_ms=0)
        consumer = AIOKafkaConsumer(bootstrap_servers=broker.address, enable_auto_commit=False, fetch_max_wait_ms=10)
        await producer.start()
        await consumer.start()
        single, batched, small = (TopicPartition(TOPIC, p) for p in range(3))
        consumer.assign([single, batched, small])
        for _ in range(10):
            await producer.send_and_wait(TOPIC, b"x" * 200, partition=small.partition)
        written = 0
        for size in sizes:
            while written < size:  # one record per produce request: one batch each
                await producer.send_and_wait(TOPIC, b"x" * 200, partition=single.partition)
                written += 1
            rows.append(("single-record batches", size, await _fetch_ms(consumer, single, size - 1)))
        for _ in range(sizes[-1] // 10):
            sends = [await producer.send(TOPIC, b"x" * 200, partition=batched.partition) for _ in range(10)]
            await asyncio.gather(*sends)
        rows.append(("batches of 10 records", sizes[-1], await _fetch_ms(consumer, batched, sizes[-1] - 1)))
        rows.append(("10 records, beside the big partitions", 10, await _fetch_ms(consumer, small, 9)))
        await consumer.stop()
        await producer.stop()
    finally:
        broker.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,5000,20000", help="records in the partition at each measurement")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    print(f"{'partition holds':40} {'records':>8} {'fetch at the end, median ms':>28}")
    for what, records, ms in asyncio.run(measure(sizes)):
        print(f"{what:40} {records:>8} {ms:>28.2f}")


if __name__ == "__main__":
    main()
