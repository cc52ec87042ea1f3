"""Kafka for both services: one group-member base, its liveness, offsets, topics, client start-up.

- `consumer`: GroupConsumer, the member both the gateway relay and the chat
  ingest pipeline are (lifecycle, rebalance, contiguous batches, lag);
- `membership`: the watchdog loop and the predecessor fence;
- `offsets`: contiguous fetches, committed offsets, lag, unowned partitions;
- `clients`: starting clients while the broker is away, one backoff;
- `topics`: creating the contract's topics where nobody declared them.
"""

from roomcast.kafka.membership import ConsumerStalled
from roomcast.kafka.topics import ensure_topics

__all__ = ["ConsumerStalled", "ensure_topics"]
