"""What the chat service's integration tests share: config, records, a running service, HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiokafka import AIOKafkaProducer

from chat.app import ChatService
from roomcast.config import ChatConfig
from roomcast.wire.events import INGEST_TOPIC, IngestRecord, encode_ingest
from tests.support import TEST_BROKER, TIMEOUT_FACTOR

READY_TIMEOUT_S = 20 * TIMEOUT_FACTOR
FLOW_TIMEOUT_S = 15 * TIMEOUT_FACTOR


def chat_config(bootstrap: str, database_url: str, **over: object) -> ChatConfig:
    """A chat service on the test broker with a short fetch wait and small batches."""
    values: dict[str, object] = dict(
        kafka_bootstrap=bootstrap,
        database_url=database_url,
        http_host="127.0.0.1",
        http_port=0,
        kafka_profile=TEST_BROKER,
        batch_max=50,
    )
    values.update(over)
    return ChatConfig(**values)  # type: ignore[arg-type]


def record(room: str, cmid: str, user: str = "alice", body: str | None = None) -> IngestRecord:
    """A message.ingest record as a gateway writes it."""
    return IngestRecord(room, user, body if body is not None else f"{user} says {cmid}", cmid, "gw-test", int(time.time() * 1000))


async def post(producer: AIOKafkaProducer, rec: IngestRecord) -> None:
    await producer.send_and_wait(INGEST_TOPIC, encode_ingest(rec), key=rec.room.encode())


async def http_get(port: int, target: str, extra_header: str = "") -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, body) of one GET over a fresh connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    extra = extra_header + "\r\n" if extra_header else ""
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: t\r\n{extra}Connection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


async def wait_until(check: Callable[[], object], what: str, timeout_s: float = FLOW_TIMEOUT_S) -> None:
    """Polls the async or sync `check` until it returns something true."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


class RunningChat:
    """A ChatService running in this loop as a task (started at once); `port` once it is ready."""

    def __init__(self, service: ChatService) -> None:
        self.service = service
        self.stop_event = asyncio.Event()
        self.ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(service.run(on_ready=self.ready.set_result, stop=self.stop_event))
        self.port = 0

    async def wait_ready(self) -> int:
        """The HTTP port, once Kafka, the store and the HTTP server are all up."""
        done, _ = await asyncio.wait({self.ready, self.task}, timeout=READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        if self.task in done:
            self.task.result()
        assert self.ready in done, "chat service not ready in time"
        self.port = self.ready.result()
        return self.port

    async def wait_listening(self) -> int:
        """The HTTP port, as soon as it listens (before Kafka is reachable, say)."""
        await wait_until(lambda: self.task.done() or self.service.http.port, "the HTTP port", READY_TIMEOUT_S)
        if self.task.done():
            self.task.result()
        return self.service.http.port

    async def stop(self) -> None:
        """Graceful: the SIGTERM path."""
        self.stop_event.set()
        await asyncio.wait_for(self.task, 20 * TIMEOUT_FACTOR)

    async def crash(self) -> None:
        """Cancel the service task: the batch in flight is neither finished nor committed."""
        if not self.task.done():
            self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
