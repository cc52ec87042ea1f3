"""Starting and stopping Kafka clients while the broker comes and goes; one backoff for all."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.protocol.group import LeaveGroupRequest

__all__ = ["Backoff", "Retry", "leave_generation_zero", "sleep_unless", "start_with_retry", "stop_quietly"]

log = logging.getLogger("roomcast.kafka.clients")

Client = TypeVar("Client", AIOKafkaConsumer, AIOKafkaProducer)


@dataclass(frozen=True)
class Retry:
    """Delays between attempts: from initial_s, doubling, up to max_s, each jittered."""

    initial_s: float = 0.05
    max_s: float = 2.0


class Backoff:
    """Jittered exponential delays (jitter keeps many members from retrying in step)."""

    def __init__(self, retry: Retry) -> None:
        self.retry = retry
        self.delay_s = retry.initial_s

    def reset(self) -> None:
        self.delay_s = self.retry.initial_s

    async def wait(self, stop: asyncio.Event) -> None:
        """Sleep the next delay (cut short by `stop`), then double it."""
        await sleep_unless(stop, self.delay_s * (0.5 + random.random()))
        self.delay_s = min(self.delay_s * 2, self.retry.max_s)


class _Stopped(Exception):
    pass


async def start_with_retry(
    make: Callable[[], Client],
    start: Callable[[Client], Awaitable[None]],
    stop: asyncio.Event,
    *,
    what: str,
    bootstrap: str,
    retry: Retry,
    on_failure: Callable[[], None] = lambda: None,
) -> Client | None:
    """make() a client and start() it, retrying with backoff while Kafka is away; None once `stop` is set.

    Cancelled (say, a watchdog gave up on a join that hangs), it closes the
    client it was starting. `on_failure` is called per failed attempt (a
    member that cannot reach Kafka is waiting, not stuck).
    """
    backoff = Backoff(retry)
    attempt = 0
    while not stop.is_set():
        attempt += 1
        client = make()
        try:
            await _until_stopped(start(client), stop)
            return client
        except (KafkaError, OSError, TimeoutError, _Stopped) as exc:
            await stop_quietly(client)
            if isinstance(exc, _Stopped):
                return None
            on_failure()
            log.warning(
                "kafka at %s is not reachable for %s (attempt %d: %s); retrying in %.1f s",
                bootstrap, what, attempt, exc or type(exc).__name__, backoff.delay_s,
            )
            await backoff.wait(stop)
        except BaseException:
            await stop_quietly(client)
            raise
    return None


async def _until_stopped(coro: Coroutine[Any, Any, None] | Awaitable[None], stop: asyncio.Event) -> None:
    """Await `coro`; raise _Stopped (after cancelling it) if `stop` is set first."""
    task = asyncio.ensure_future(coro)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task.done():
        task.result()
        return
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)  # still raises if we are cancelled ourselves
    raise _Stopped()


async def sleep_unless(stop: asyncio.Event, delay_s: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), delay_s)
    except TimeoutError:
        pass


async def stop_quietly(*clients: AIOKafkaConsumer | AIOKafkaProducer | None) -> None:
    for client in clients:
        if client is None:
            continue
        try:
            await client.stop()
        except Exception as exc:  # closing: nothing left to save
            log.warning("closing %s failed: %s", type(client).__name__, exc)


async def leave_generation_zero(consumer: AIOKafkaConsumer) -> None:
    """Send LeaveGroup when the generation is 0, which aiokafka skips (Tansu starts at 0).

    Without it the next member waits out this one's session timeout (~11 s
    measured with a 6 s session). Real Kafka starts at generation 1: no-op.
    """
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or getattr(coordinator, "generation", None) != 0 or not coordinator.member_id:
        return
    try:
        await asyncio.wait_for(coordinator._send_req(LeaveGroupRequest(coordinator.group_id, coordinator.member_id)), 2.0)
    except Exception as exc:
        log.debug("LeaveGroup for generation 0 failed: %s", exc)
