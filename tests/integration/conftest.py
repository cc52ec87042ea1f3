"""A throwaway Postgres cluster for the integration tests.

One cluster per test session (initdb plus start is about a second), on a free
loopback port with its data in a temp dir; each test gets its own database
(tens of milliseconds), dropped at its end. It never touches a Postgres the
machine may already run.

initdb and pg_ctl come from the highest version under /usr/lib/postgresql
(Debian's layout), else from PATH. initdb refuses to run as root, so as root
the cluster runs as the `postgres` OS user that Debian's package creates.
Missing binaries fail the Postgres tests with the install step; they skip only
for a non-root run without ROOMCAST_REQUIRE_POSTGRES (a developer machine
without Postgres; CI runs as root).
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from roomcast.embedded import free_port
from roomcast.kafka import ensure_topics
from tests.integration.chat_harness import RunningChat

INSTALL_HINT = "apt-get install -y postgresql"
_PG_LIB = Path("/usr/lib/postgresql")
_PG_OS_USER = "postgres"
_SUPERUSER = "postgres"
# A test cluster holds nothing worth an fsync; durability is not what these
# tests check, and skipping it keeps a database create under 50 ms.
_SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
    # A lock cycle should be reported fast (the seq tests race writers on purpose).
    "deadlock_timeout": "100ms",
}
_START_ATTEMPTS = 3  # a free port can be taken between free_port() and the bind


def find_postgres_bindir() -> Path | None:
    """The directory holding initdb and pg_ctl: newest /usr/lib/postgresql/<v>/bin, else PATH."""
    versions = []
    if _PG_LIB.is_dir():
        for child in _PG_LIB.iterdir():
            if child.name.isdigit() and (child / "bin" / "initdb").exists() and (child / "bin" / "pg_ctl").exists():
                versions.append((int(child.name), child / "bin"))
    if versions:
        return max(versions)[1]
    initdb = shutil.which("initdb")
    if initdb is not None and shutil.which("pg_ctl") is not None:
        return Path(initdb).resolve().parent
    return None


@dataclass
class PostgresCluster:
    """A running throwaway cluster; `dsn(db)` connects to one of its databases as the superuser."""

    bindir: Path
    data_dir: Path
    port: int
    run_as: str | None  # the OS user the server runs as (None: this one)
    host: str = "127.0.0.1"

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{_SUPERUSER}@{self.host}:{self.port}/{database}"

    def stop(self) -> None:
        # immediate: the data is thrown away, so no shutdown checkpoint is worth waiting for.
        _run_pg(self, "pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop", check=False)


def _as_user(run_as: str | None, argv: list[str]) -> list[str]:
    return argv if run_as is None else ["runuser", "-u", run_as, "--", *argv]


def _run_pg(cluster: PostgresCluster, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = _as_user(cluster.run_as, [str(cluster.bindir / tool), *args])
    # cwd: the postgres user may not be allowed into the caller's directory.
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=cluster.data_dir.parent, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def start_postgres_cluster() -> PostgresCluster:
    """initdb a cluster in a new temp dir and start it on a free port.

    Raises pytest's fail/skip when the binaries are missing (see the module
    docstring), RuntimeError when initdb or the start fails.
    """
    bindir = find_postgres_bindir()
    is_root = os.geteuid() == 0
    if bindir is None:
        message = f"Postgres binaries (initdb, pg_ctl) not found under {_PG_LIB} or on PATH: {INSTALL_HINT}"
        if is_root or os.environ.get("ROOMCAST_REQUIRE_POSTGRES"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    run_as: str | None = None
    base = Path(tempfile.mkdtemp(prefix="roomcast-pg-"))
    if is_root:
        try:
            account = pwd.getpwnam(_PG_OS_USER)
        except KeyError:
            shutil.rmtree(base, ignore_errors=True)
            pytest.fail(f"running as root needs the `{_PG_OS_USER}` OS user to own the test cluster: {INSTALL_HINT}", pytrace=False)
        run_as = _PG_OS_USER
        os.chown(base, account.pw_uid, account.pw_gid)
    cluster = PostgresCluster(bindir, base / "data", 0, run_as)
    try:
        _run_pg(
            cluster, "initdb", "-D", str(cluster.data_dir), "-U", _SUPERUSER, "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions",
        )
        for attempt in itertools.count(1):
            cluster.port = free_port()
            options = " ".join(
                [f"-c port={cluster.port}", f"-c unix_socket_directories={base}"]
                + [f"-c {k}={v}" for k, v in _SERVER_SETTINGS.items()]
            )
            result = _run_pg(
                cluster, "pg_ctl", "-D", str(cluster.data_dir), "-l", str(base / "server.log"),
                "-o", options, "-w", "-t", "30", "start", check=False,
            )
            if result.returncode == 0:
                return cluster
            if attempt >= _START_ATTEMPTS:
                log = (base / "server.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"postgres did not start on port {cluster.port}:\n{result.stderr}\n{log}")
    except BaseException:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
        raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One throwaway Postgres cluster for the whole session (stopped and deleted at its end)."""
    started = time.monotonic()
    cluster = start_postgres_cluster()
    print(f"\npostgres test cluster on port {cluster.port} ready in {time.monotonic() - started:.2f} s")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.data_dir.parent, ignore_errors=True)


_database_numbers = itertools.count(1)


@pytest.fixture
async def postgres_url(postgres_cluster: PostgresCluster) -> AsyncIterator[str]:
    """The URL of a new, empty database of the session cluster, dropped after the test."""
    import asyncpg

    name = f"roomcast_test_{os.getpid()}_{next(_database_numbers)}"
    admin = await asyncpg.connect(postgres_cluster.dsn())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield postgres_cluster.dsn(name)
    finally:
        admin = await asyncpg.connect(postgres_cluster.dsn())
        try:
            # FORCE: a test that failed may have left a connection open.
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


# ---- Kafka, for the chat service's tests ---------------------------------------------

CHAT_TEST_PARTITIONS = 2


@pytest.fixture
async def bootstrap(kafka_bootstrap: str) -> str:
    """The test's broker with message.ingest and message.created created."""
    await ensure_topics(kafka_bootstrap, CHAT_TEST_PARTITIONS)
    return kafka_bootstrap


@pytest.fixture
async def producer(bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()


@pytest.fixture
async def services() -> AsyncIterator[list[RunningChat]]:
    """Chat services a test starts (append them); each is stopped at the end, even when the test fails."""
    running: list[RunningChat] = []
    try:
        yield running
    finally:
        for r in running:
            await r.crash()


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A redis-py client of the test's Redis (for PUBLISH, NUMSUB and the like)."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()
