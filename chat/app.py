"""The chat service process: store + history HTTP API + ingest pipeline.

`roomcast chat` calls `main(load(ChatConfig, flags))`; tests and the dev stack
call `await run_chat(config, on_ready=..., stop=...)` in their own loop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable

from chat.adapters.http import Authorizer, build_http_server
from chat.adapters.kafka import IngestPipeline, KafkaTuning, PipelineStatistics
from chat.storage import MessageStore, open_store
from roomcast.config import ChatConfig
from roomcast.logs import setup_logging

__all__ = ["SHUTDOWN_TIMEOUT_S", "ChatService", "main", "run_chat"]

log = logging.getLogger("roomcast.chat")

SHUTDOWN_TIMEOUT_S = 15.0  # the whole drain, in steps bounded below


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
    ) -> None:
        """Raises ConfigError for bad auth settings; `authorize` None means config.auth_mode's check."""
        self.config = config
        self.store = store
        self.pipeline = IngestPipeline(config, store, tuning=tuning)
        self.http = build_http_server(store, config, authorize=authorize)

    def statistics(self) -> PipelineStatistics:
        return self.pipeline.statistics()

    async def run(self, *, on_ready: Callable[[int], None] | None = None, stop: asyncio.Event | None = None) -> None:
        """Serve until `stop` is set (or SIGTERM/SIGINT), then drain within SHUTDOWN_TIMEOUT_S.

        Raises StoreError when the store cannot be opened, OSError when the
        HTTP port cannot be bound; Kafka being away is retried, not raised.
        """
        stop = stop if stop is not None else asyncio.Event()
        restore_signals = _install_signal_handlers(stop)
        run_task: asyncio.Task[None] | None = None
        try:
            await self.store.start()
            await self.http.start()  # history is served even while Kafka is still away
            if not await self.pipeline.connect(stop):
                return  # stopped before Kafka answered
            log.info(
                "chat service ready: history API on %s:%d, event loop %s",
                self.config.http_host,
                self.http.port,
                type(asyncio.get_running_loop()).__module__.split(".")[0],
            )
            if on_ready is not None:
                on_ready(self.http.port)
            run_task = asyncio.create_task(self.pipeline.run(stop), name="roomcast-chat-ingest")
            stopped = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({run_task, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
            if run_task.done():
                run_task.result()  # a bug in the loop: raise it (after the drain below)
        except asyncio.CancelledError:
            # A second signal, or our caller cancelled: no grace for the batch.
            if run_task is not None:
                run_task.cancel()
            raise
        finally:
            stop.set()
            try:
                await self._drain(run_task)
            finally:
                restore_signals()

    async def _drain(self, run_task: asyncio.Task[None] | None) -> None:
        # 1. Stop fetching; the in-flight batch finishes (and commits) or is
        #    abandoned uncommitted, bounded by the pipeline's shutdown grace.
        if run_task is not None and not run_task.done():
            done, _ = await asyncio.wait({run_task}, timeout=SHUTDOWN_TIMEOUT_S - 7.0)  # 7 s: steps 2-4
            if not done:
                log.warning("the ingest loop did not stop in time; cancelling it (its batch stays uncommitted)")
                run_task.cancel()
                await asyncio.gather(run_task, return_exceptions=True)
        # 2. Leave the group and flush and close the producer.
        await _bounded(self.pipeline.aclose(), 3.0, "closing the Kafka clients")
        # 3. Close HTTP before the store, so no request in flight meets a closed store.
        await _bounded(self.http.aclose(timeout_s=1.0), 2.0, "closing the HTTP server")
        # 4. Close the store (waits for its last call to finish).
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
    Kafka consumer has started. Raises NotImplementedError/ValueError for an
    unsupported database_url, StoreError when the database cannot be opened,
    OSError when the HTTP port is taken.
    """
    service = ChatService(config, open_store(config.database_url))
    await service.run(on_ready=on_ready, stop=stop)


def main(config: ChatConfig) -> None:
    """Run the chat service under uvloop until SIGTERM/SIGINT (the `roomcast chat` entry point)."""
    import uvloop

    if not logging.getLogger().handlers:  # the CLI sets logging up; a bare call gets the same
        setup_logging(config.log_level, config.log_format == "json")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(run_chat(config))


def _install_signal_handlers(stop: asyncio.Event) -> Callable[[], None]:
    """First SIGTERM/SIGINT sets `stop`; a second one cancels the running task (forced exit).

    Only for a signal still at Python's default disposition: a program that
    embeds run_chat and handles signals itself (the dev stack) keeps its own
    handlers. Returns the function that removes what was installed.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    installed: list[int] = []

    def on_signal(signum: int) -> None:
        if not stop.is_set():
            log.info("%s: draining (send it again to force exit)", signal.Signals(signum).name)
            stop.set()
        elif task is not None:
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
