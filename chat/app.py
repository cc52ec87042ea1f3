"""The chat service process: store + history HTTP API + ingest pipeline + retention sweep.

`roomcast chat` calls `main(load(ChatConfig, flags))`; tests and the dev stack
call `await run_chat(config, on_ready=..., stop=...)` in their own loop. The
store is chosen by `database_url` (`open_store`: SQLite or Postgres).

Retention (config.retention_count, retention_age_s): the store keeps each
room it writes within the count as part of every batch, and a background
task calls `store.enforce_retention` every RETENTION_SWEEP_S for the age
limit (and for rooms idle since the count was lowered). History's oldest_seq
moves up with it, which is how a gateway tells a `since` older than the
retained history (`recovered:false`, PROTOCOL.md 3).

The HTTP port also serves /metrics (`roomcast_chat_*`) and /readyz: 200 once
the store is open and the Kafka consumer started, 503 before and from the
moment a stop begins.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable

from chat.adapters.http import Authorizer, build_http_server
from chat.adapters.kafka import IngestPipeline, PipelineStatistics, wall_clock_ms
from chat.storage import MessageStore, Retention, StoreError, open_store
from roomcast.config import ChatConfig, KafkaTuning
from roomcast.logs import setup_logging
from roomcast.kafka import ConsumerStalled
from roomcast.metrics import MetricsRegistry
from roomcast.stopping import StopAction, StopSignals

__all__ = ["RETENTION_SWEEP_S", "SHUTDOWN_TIMEOUT_S", "ChatService", "main", "retention_of", "run_chat"]

log = logging.getLogger("roomcast.chat")

SHUTDOWN_TIMEOUT_S = 15.0  # the whole drain, in steps bounded below
RETENTION_SWEEP_S = 60.0  # how often the age limit is enforced


def retention_of(config: ChatConfig) -> Retention:
    """The store Retention of config.retention_count and retention_age_s (0: no limit on that axis).

    Raises ValueError for a negative setting.
    """
    return Retention(
        keep_messages=config.retention_count or None,
        keep_ms=config.retention_age_s * 1000 or None,
    )


class ChatService:
    """One chat service instance over a given store (run_chat builds it from the config).

    `run()` once; it owns the store's lifecycle (starts and closes it).
    """

    def __init__(
        self,
        config: ChatConfig,
        store: MessageStore,
        *,
        tuning: KafkaTuning = KafkaTuning(),
        authorize: Authorizer | None = None,
        clock_ms: Callable[[], int] = wall_clock_ms,
        retention_sweep_s: float = RETENTION_SWEEP_S,
    ) -> None:
        """Raises ConfigError for bad auth settings; `authorize` None means config.auth_mode's check.

        `clock_ms` stamps messages and dates the retention sweep (tests pass
        their own); `retention_sweep_s` is the period of that sweep.
        """
        self.config = config
        self.store = store
        self.retention_sweep_s = retention_sweep_s
        self._clock_ms = clock_ms
        self._store_open = False
        self._stop: asyncio.Event | None = None
        self.metrics = MetricsRegistry()
        self.pipeline = IngestPipeline(config, store, tuning=tuning, clock_ms=clock_ms, metrics=self.metrics)
        self._init_metrics()
        self.http = build_http_server(
            store, config, authorize=authorize, metrics=self.metrics, ready=lambda: self.ready
        )

    def _init_metrics(self) -> None:
        m = self.metrics
        m.gauge("roomcast_chat_ready", "1 when ready: store open, Kafka consumer started, not stopping", lambda: int(self.ready))
        # Read at scrape time from the store's own counters.
        m.counter_fn(
            "roomcast_chat_seq_conflicts_total", "batches that hit UNIQUE(room, seq): two writers raced (retried)",
            lambda: self.store.statistics().seq_conflicts,
        )
        m.counter_fn(
            "roomcast_chat_dedupe_conflicts_total",
            "batches that hit UNIQUE(room, user, client_msg_id): another writer stored the same post (retried)",
            lambda: self.store.statistics().dedupe_conflicts,
        )
        m.counter_fn("roomcast_chat_pruned_total", "messages deleted by retention", lambda: self.store.statistics().pruned)

    @property
    def ready(self) -> bool:
        """Store open, Kafka consumer started (it joins its group in the background), not stopping."""
        stop = self._stop
        return self._store_open and self.pipeline.connected and stop is not None and not stop.is_set()

    def statistics(self) -> PipelineStatistics:
        return self.pipeline.statistics()

    async def run(self, *, on_ready: Callable[[int], None] | None = None, stop: asyncio.Event | None = None) -> None:
        """Serve until `stop` is set (or SIGTERM/SIGINT), then drain within SHUTDOWN_TIMEOUT_S.

        Raises StoreError when the store cannot be opened, OSError when the
        HTTP port cannot be bound; Kafka being away is retried, not raised.
        """
        stop = self._stop = stop if stop is not None else asyncio.Event()
        restore_signals = _install_signal_handlers(stop)
        run_task: asyncio.Task[None] | None = None
        sweep_task: asyncio.Task[None] | None = None
        try:
            await self.store.start()
            self._store_open = True
            sweep_task = asyncio.create_task(self._sweep_retention(stop), name="roomcast-chat-retention")
            await self.http.start()  # history is served even while Kafka is still away
            if not await self.pipeline.connect(stop):
                return  # stopped before Kafka answered
            run_task = asyncio.create_task(self.pipeline.run(stop), name="roomcast-chat-ingest")
            # Ready once the consumer has joined its group (the pipeline's run joins it, watched).
            while not (self.pipeline.connected or run_task.done() or stop.is_set()):
                await asyncio.sleep(0.02)
            if self.pipeline.connected:
                log.info(
                    "chat service ready: history API on %s:%d, event loop %s",
                    self.config.http_host,
                    self.http.port,
                    type(asyncio.get_running_loop()).__module__.split(".")[0],
                )
                if on_ready is not None:
                    on_ready(self.http.port)
            stopped = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({run_task, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
            if run_task.done():
                run_task.result()  # a bug in the loop: raise it (after the drain below)
        except asyncio.CancelledError:
            # A second signal, or our caller cancelled: no grace for the batch.
            for task in (run_task, sweep_task):
                if task is not None:
                    task.cancel()
            raise
        finally:
            stop.set()  # readiness off first: /readyz answers 503 from here on
            try:
                await self._drain(run_task, sweep_task)
            finally:
                restore_signals()

    async def _sweep_retention(self, stop: asyncio.Event) -> None:
        """Every retention_sweep_s until `stop`: store.enforce_retention. Failures are logged, not raised."""
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.retention_sweep_s)
                return
            except TimeoutError:
                pass
            started = time.monotonic()
            try:
                pruned = await self.store.enforce_retention(self._clock_ms())
            except StoreError as exc:
                log.warning("retention sweep failed (%s); next try in %.0f s", exc, self.retention_sweep_s)
                continue
            except Exception:
                log.exception("retention sweep failed; next try in %.0f s", self.retention_sweep_s)
                continue
            if pruned:
                log.info("retention sweep dropped %d messages in %.2f s", pruned, time.monotonic() - started)

    async def _drain(self, run_task: asyncio.Task[None] | None, sweep_task: asyncio.Task[None] | None) -> None:
        # 1. Stop fetching; the in-flight batch finishes (and commits) or is
        #    abandoned uncommitted, bounded by the pipeline's shutdown grace.
        #    The retention sweep sees `stop` too and ends after its current pass.
        pending = {t for t in (run_task, sweep_task) if t is not None and not t.done()}
        if pending:
            await asyncio.wait(pending, timeout=SHUTDOWN_TIMEOUT_S - 7.0)  # 7 s: steps 2-4
            for task in pending:
                if not task.done():
                    log.warning("%s did not stop in time; cancelling it", task.get_name())
                    task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        # 2. Leave the group and flush and close the producer.
        await _bounded(self.pipeline.aclose(), 3.0, "closing the Kafka clients")
        # 3. Close HTTP before the store, so no request in flight meets a closed store.
        await _bounded(self.http.aclose(timeout_s=1.0), 2.0, "closing the HTTP server")
        # 4. Close the store (waits for its last call to finish).
        self._store_open = False
        await _bounded(self.store.aclose(), 3.0, "closing the store")
        log.info("chat service stopped")


async def run_chat(
    config: ChatConfig,
    *,
    on_ready: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Run the chat service until `stop` is set or SIGTERM/SIGINT; then drain and return.

    SIGTERM/SIGINT are handled only when nobody else handles them (see
    _install_signal_handlers); a second one forces the exit.

    `on_ready(http_port)` is called once the history API listens and the
    Kafka consumer has started. Raises ValueError for an unsupported
    database_url or a negative retention setting, StoreError when the
    database cannot be opened or migrated, OSError when the HTTP port is taken.
    """
    service = ChatService(config, open_store(config.database_url, retention=retention_of(config)))
    await service.run(on_ready=on_ready, stop=stop)


def main(config: ChatConfig) -> None:
    """Run the chat service under uvloop until SIGTERM/SIGINT (the `roomcast chat` entry point)."""
    import uvloop

    if not logging.getLogger().handlers:  # the CLI sets logging up; a bare call gets the same
        setup_logging(config.log_level, config.log_format == "json")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            runner.run(run_chat(config))
        except ConsumerStalled as exc:
            # Rejoining did not help: exit non-zero so the supervisor or
            # Kubernetes starts a fresh process.
            log.error("%s: exiting", exc)
            sys.exit(3)


def _install_signal_handlers(stop: asyncio.Event) -> Callable[[], None]:
    """First SIGTERM/SIGINT sets `stop`; a later one cancels the running task (forced exit).

    The same stop arriving twice (roomcast.stopping) is not a second one.

    Only for a signal still at Python's default disposition: a program that
    embeds run_chat and handles signals itself (the dev stack) keeps its own
    handlers. Returns the function that removes what was installed.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    installed: list[int] = []

    signals = StopSignals()

    def on_signal(signum: int) -> None:
        action = signals.received(time.monotonic())
        if action is StopAction.DRAIN:
            log.info("%s: draining (send it again to force exit)", signal.Signals(signum).name)
            stop.set()
        elif action is StopAction.FORCE and task is not None:
            log.warning("second %s: exiting without a full drain", signal.Signals(signum).name)
            task.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(signum) not in (signal.SIG_DFL, signal.default_int_handler):
            continue  # someone else handles it
        try:
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):
            pass

    def restore() -> None:
        for signum in installed:
            loop.remove_signal_handler(signum)

    return restore


async def _bounded(coro: object, timeout_s: float, what: str) -> None:
    try:
        await asyncio.wait_for(coro, timeout_s)  # type: ignore[arg-type]
    except TimeoutError:
        log.warning("%s took over %.1f s; gave up", what, timeout_s)
    except Exception:
        log.exception("%s failed", what)
