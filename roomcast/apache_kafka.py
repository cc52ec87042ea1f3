"""A real single-node Apache Kafka (KRaft) on loopback, for the dev stack and the tests.

The jars come from Maven Central through tools/kafka/pom.xml, resolved once
per pom into a cache outside the repository ($XDG_CACHE_HOME/roomcast, else
~/.cache/roomcast); nothing is downloaded from anywhere else. One JVM is
both broker and controller, its storage formatted in a data directory of its
own, with a bounded heap. Production runs its own Kafka; this never ships.

Facts measured on this machine kind (README, "Brokers"): resolving the jars
takes 3 to 11 s the first time; formatting 1.3 s; the broker serves about 3 s
after it starts; a broker killed -9 and started again on the same data is
back in about 5.6 s with the short broker session below (13 s by default,
because the controller refuses the re-registration until the old session
times out).
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from roomcast.embedded import ManagedProcess, MissingBinary, _check_port, _listening, _spawn_logged, free_port

__all__ = ["find_kafka_jars", "restart_kafka", "start_kafka"]

POM = Path(__file__).resolve().parents[1] / "tools" / "kafka" / "pom.xml"
HEAP = ("-Xms256m", "-Xmx512m")
READY_TIMEOUT_S = 60.0

_LOG4J = """\
rootLogger.level=WARN
rootLogger.appenderRef.stdout.ref=STDOUT
appender.stdout.type=Console
appender.stdout.name=STDOUT
appender.stdout.layout.type=PatternLayout
appender.stdout.layout.pattern=[%d] %p %m (%c)%n
logger.started.name=kafka.server.KafkaRaftServer
logger.started.level=INFO
"""


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise MissingBinary("real Kafka needs a Java runtime (17 or newer): apt-get install openjdk-17-jre-headless")
    return java


def find_kafka_jars() -> Path:
    """The folder of the broker's jars, resolved with Maven on first use. Raises MissingBinary naming what to install."""
    _java()
    if not POM.exists():
        raise MissingBinary(f"{POM} is missing: real Kafka runs from a roomcast source checkout")
    digest = hashlib.sha1(POM.read_bytes()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "roomcast"
    jars = cache / f"kafka-jars-{digest}"
    if (jars / ".complete").exists():
        return jars
    mvn = shutil.which("mvn")
    if mvn is None:
        raise MissingBinary("real Kafka's jars come from Maven Central through Maven: apt-get install maven")
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="kafka-jars-", dir=cache))
    proc = subprocess.run(
        [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies", "-DincludeScope=runtime", f"-DoutputDirectory={staging}"],
        capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise MissingBinary(f"mvn could not resolve Kafka's jars from Maven Central:\n{(proc.stdout + proc.stderr)[-2000:]}")
    (staging / ".complete").touch()
    try:
        staging.rename(jars)
    except OSError:  # another process got there first
        shutil.rmtree(staging, ignore_errors=True)
    return jars


def _properties(data: Path, host: str, port: int, controller_port: int) -> str:
    return "\n".join([
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.bootstrap.servers={host}:{controller_port}",
        f"listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}",
        f"advertised.listeners=PLAINTEXT://{host}:{port}",
        "controller.listener.names=CONTROLLER",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        f"log.dirs={data / 'log'}",
        "num.partitions=4",
        "offsets.topic.replication.factor=1",
        "offsets.topic.num.partitions=4",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        # One node: no reason to wait for more members before the first rebalance.
        "group.initial.rebalance.delay.ms=0",
        "group.min.session.timeout.ms=1000",
        # A restarted broker re-registers in ~5.6 s instead of ~13 s.
        "broker.session.timeout.ms=3000",
        "broker.heartbeat.interval.ms=500",
        "",
    ])


def start_kafka(host: str = "127.0.0.1", port: int = 0, log_path: Path | None = None, data_dir: Path | None = None) -> ManagedProcess:
    """Format a fresh KRaft node in data_dir (a temporary one if None) and start it; wait until it listens."""
    java = _java()
    jars = find_kafka_jars()
    _check_port(host, port, "kafka")
    port = port or free_port(host)
    controller_port = free_port(host)
    data = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="roomcast-kafka-"))
    data.mkdir(parents=True, exist_ok=True)
    props = data / "server.properties"
    props.write_text(_properties(data, host, port, controller_port))
    (data / "log4j2.properties").write_text(_LOG4J)
    # A Kafka Uuid: 16 random bytes, base64url without padding.
    cluster_id = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
    classpath = f"{jars}/*"
    subprocess.run(
        [java, "-cp", classpath, "kafka.tools.StorageTool", "format", "--standalone", "-t", cluster_id, "-c", str(props)],
        check=True, capture_output=True, timeout=120,
    )
    managed = ManagedProcess("kafka", _spawn_kafka(java, classpath, data, log_path), host, port, log_path)
    managed.extra.update({"data_dir": str(data), "controller_port": str(controller_port)})
    return _listening(managed, READY_TIMEOUT_S)


def _spawn_kafka(java: str, classpath: str, data: Path, log_path: Path | None) -> subprocess.Popen[bytes]:
    return _spawn_logged(
        [java, *HEAP, "-cp", classpath, f"-Dlog4j2.configurationFile={data / 'log4j2.properties'}", "kafka.Kafka", str(data / "server.properties")],
        log_path,
    )


def restart_kafka(managed: ManagedProcess) -> None:
    """Start the broker again on its data and ports (after a kill -9, say); wait until it listens."""
    data = Path(managed.extra["data_dir"])
    managed.proc = _spawn_kafka(_java(), f"{find_kafka_jars()}/*", data, managed.log_path)
    _listening(managed, READY_TIMEOUT_S)
