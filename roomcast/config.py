"""All settings of roomcast, in one place.

Each service gets one frozen section built once at start-up and passed down;
nothing else reads the environment. A setting comes from, in order of
precedence: a command-line flag, the environment variable `ROOMCAST_<NAME>`,
the default below. A malformed or unknown setting stops start-up with a
`ConfigError` naming the setting and the fix.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any, Mapping, TypeVar

from roomcast.wire.frames import DEFAULT_MAX_BODY_BYTES

__all__ = [
    "ConfigError",
    "GatewayConfig",
    "ChatConfig",
    "DevConfig",
    "BROKER_PROFILES",
    "BrokerProfile",
    "broker_profile",
    "GatewayTimings",
    "GATEWAY_TIMINGS",
    "KafkaTuning",
    "load",
    "to_environ",
    "settings_table",
    "ENV_PREFIX",
]

ENV_PREFIX = "ROOMCAST_"


class ConfigError(Exception):
    """A setting is missing, malformed or unknown. The message says which and how to fix it."""


def setting(default: Any, doc: str, *, unit: str = "", choices: tuple[str, ...] = ()) -> Any:
    return field(default=default, metadata={"doc": doc, "unit": unit, "choices": choices})


@dataclass(frozen=True)
class GatewayConfig:
    """The WebSocket gateway (`roomcast gateway`)."""

    host: str = setting("0.0.0.0", "address the WebSocket listener binds")
    port: int = setting(8080, "WebSocket port; every worker binds it with SO_REUSEPORT")
    workers: int = setting(1, "worker processes, one per core is the rule")
    gateway_id: str = setting("", "this gateway's name in ingest records; default <hostname>")
    redis_url: str = setting("redis://127.0.0.1:6379", "Redis for room pub/sub")
    redis_mode: str = setting(
        "plain", "plain: one Redis, PUBLISH/SUBSCRIBE; cluster: Redis Cluster, sharded SPUBLISH/SSUBSCRIBE",
        choices=("plain", "cluster"),
    )
    kafka_bootstrap: str = setting(
        "", "Kafka bootstrap servers host:port[,host:port]; empty: no posting (every post gets `unavailable`)"
    )
    history_url: str = setting(
        "", "base URL of the chat service's history API, for join seq and replay; empty: none"
    )
    # Pool and timeouts of the gateway's keep-alive client of the history API
    # (gateway/adapters/history.py): a reconnect storm of joins with `since`
    # shares these connections instead of opening one per join.
    history_pool_size: int = setting(16, "most TCP connections a worker keeps open to the history API")
    history_timeout_s: float = setting(
        3.0, "a history request (waiting for a pooled connection included) gives up after this", unit="s"
    )
    history_connect_timeout_s: float = setting(1.0, "connecting to the history API gives up after this", unit="s")
    history_keepalive_s: float = setting(
        15.0, "an idle pooled connection is closed after this; keep it under the chat service's 30 s idle close", unit="s"
    )
    auth_mode: str = setting("dev", "dev: ?user= names the user, no token; jwt: tokens required", choices=("dev", "jwt"))
    jwt_secret: str = setting("", "HS256 key for auth_mode=jwt")
    jwt_public_key: str = setting("", "PEM public key (or @path to one) to accept RS256 tokens too")
    service_key: str = setting(
        "", "auth_mode=jwt: key (32+ bytes, the chat service's too) the gateway signs its history requests with; "
        "empty: they are signed with jwt_secret"
    )
    admin_port: int = setting(9100, "admin HTTP port (/metrics, /healthz, /readyz); worker i uses admin_port + i; 0: off")
    max_frame_bytes: int = setting(64 * 1024, "largest client frame; bigger closes with 1009", unit="bytes")
    max_body_bytes: int = setting(DEFAULT_MAX_BODY_BYTES, "largest message body (UTF-8); bigger gets `too_large`", unit="bytes")
    send_rate_per_s: float = setting(20.0, "sustained posts per connection", unit="1/s")
    send_burst: int = setting(40, "posts a connection may make at once before `rate_limited`")
    abuse_max_errors: int = setting(30, "refused frames within abuse_window_ms before a 1008 close")
    abuse_window_ms: int = setting(10_000, "window for abuse_max_errors", unit="ms")
    max_connections: int = setting(60_000, "connections per worker; beyond it the upgrade gets HTTP 503")
    send_buffer_limit_bytes: int = setting(
        1024 * 1024, "bytes queued to one socket before it is closed with 4000", unit="bytes"
    )
    ping_interval_s: float = setting(20.0, "ping an idle connection after this long", unit="s")
    ping_timeout_s: float = setting(20.0, "drop a connection whose pong is this late", unit="s")
    produce_linger_ms: int = setting(2, "Kafka producer linger for message.ingest", unit="ms")
    produce_timeout_ms: int = setting(5000, "a post not acked by Kafka in this time gets `unavailable`", unit="ms")
    kafka_profile: str = setting(
        "kafka", "the broker's engine, which picks client settings (BROKER_PROFILES): kafka (Apache Kafka) or tansu (the embedded broker)",
        choices=("kafka", "tansu"),
    )
    fetch_max_wait_ms: int = setting(0, "Kafka consumer fetch wait; 0: the kafka_profile's (kafka 500, tansu 10)", unit="ms")
    kafka_session_timeout_ms: int = setting(
        6000, "the relay's consumer-group session: a dead worker's partitions move on after it", unit="ms"
    )
    kafka_static_membership: bool = setting(
        False, "join realtime-gateway-group with a group_instance_id per worker (real Kafka; the embedded broker cannot)"
    )
    drain_window_s: float = setting(5.0, "spread the 1012 closes of a drain over this window", unit="s")
    drain_timeout_s: float = setting(30.0, "the whole drain is bounded by this", unit="s")
    test_echo_route: bool = setting(False, "serve /echo through the frame layer (conformance tests only)")
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))
    log_format: str = setting("text", "text for people, json for log collectors", choices=("text", "json"))


@dataclass(frozen=True)
class ChatConfig:
    """The chat service (`roomcast chat`)."""

    kafka_bootstrap: str = setting("127.0.0.1:9092", "Kafka bootstrap servers host:port[,host:port]")
    database_url: str = setting("sqlite:///roomcast.db", "sqlite:///PATH (embedded) or postgresql://... (production)")
    http_host: str = setting("0.0.0.0", "address of the history HTTP API")
    http_port: int = setting(8081, "port of the history HTTP API")
    batch_max: int = setting(500, "ingest records handled per batch")
    kafka_profile: str = setting(
        "kafka", "the broker's engine, which picks client settings (BROKER_PROFILES): kafka (Apache Kafka) or tansu (the embedded broker)",
        choices=("kafka", "tansu"),
    )
    fetch_max_wait_ms: int = setting(0, "Kafka consumer fetch wait; 0: the kafka_profile's (kafka 500, tansu 10)", unit="ms")
    instance_id: str = setting("", "this instance's name in group chat-service; default <hostname>")
    kafka_session_timeout_ms: int = setting(
        6000, "the ingest consumer-group session: a dead instance's partitions move on after it", unit="ms"
    )
    kafka_static_membership: bool = setting(
        False, "join chat-service with a group_instance_id (instance_id; real Kafka; the embedded broker cannot)"
    )
    # 0: the pipeline hands a whole batch's events to the producer at once, so
    # they share a request anyway; a linger only delayed them (e2e p50 29.6 ->
    # 18.3 ms at 1,000 msgs/s, PERFORMANCE.md "Hops").
    produce_linger_ms: int = setting(0, "Kafka producer linger for message.created", unit="ms")
    max_body_bytes: int = setting(
        DEFAULT_MAX_BODY_BYTES, "largest message body (UTF-8) stored; larger ingest records are skipped; same env as the gateway's", unit="bytes"
    )
    page_ws_url: str = setting("", "WebSocket URL the demo page connects to; empty: the page is not served")
    auth_mode: str = setting("dev", "dev: history is open; jwt: history needs the same token as the WebSocket", choices=("dev", "jwt"))
    jwt_secret: str = setting("", "HS256 key for auth_mode=jwt")
    jwt_public_key: str = setting("", "PEM public key (or @path to one) to accept RS256 tokens too")
    service_key: str = setting(
        "", "auth_mode=jwt: key (32+ bytes, the gateways' too) of the gateways' history requests; empty: user tokens only"
    )
    retention_count: int = setting(10_000, "messages kept per room for history and `since` replay; 0: all")
    retention_age_s: int = setting(7 * 24 * 3600, "messages older than this are dropped from history; 0: kept", unit="s")
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))
    log_format: str = setting("text", "text for people, json for log collectors", choices=("text", "json"))


@dataclass(frozen=True)
class DevConfig:
    """The all-in-one embedded stack (`roomcast dev`)."""

    host: str = setting("127.0.0.1", "address every service binds")
    port: int = setting(8080, "WebSocket port")
    workers: int = setting(2, "gateway worker processes")
    data_dir: str = setting(".roomcast-dev", "where the SQLite database and logs go")
    partitions: int = setting(4, "partitions of each topic")
    broker: str = setting(
        "tansu", "the Kafka-protocol broker to start: tansu (embedded, no Java) or kafka (Apache Kafka; needs a JDK and Maven)",
        choices=("tansu", "kafka"),
    )
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))


@dataclass(frozen=True)
class BrokerProfile:
    """Kafka client settings that depend on the broker's engine."""

    fetch_max_wait_ms: int
    idempotent_producer: bool


BROKER_PROFILES = {
    # Apache Kafka wakes a waiting fetch when data arrives, so a long poll
    # costs no latency; the idempotent producer is what its operators expect.
    "kafka": BrokerProfile(fetch_max_wait_ms=500, idempotent_producer=True),
    # Tansu 0.6 never wakes a waiting fetch (each waits out its maximum), and
    # has no InitProducerId (no idempotent producer; dedupe is client_msg_id).
    "tansu": BrokerProfile(fetch_max_wait_ms=10, idempotent_producer=False),
}


def broker_profile(config: Any) -> BrokerProfile:
    """The client settings for a GatewayConfig's or ChatConfig's kafka_profile, with its own fetch wait if set."""
    profile = BROKER_PROFILES[config.kafka_profile]
    if config.fetch_max_wait_ms:
        return dataclasses.replace(profile, fetch_max_wait_ms=config.fetch_max_wait_ms)
    return profile


@dataclass(frozen=True)
class GatewayTimings:
    """Bounds inside a gateway worker. Not user settings: each is tied to another
    fact (a protocol rule, a group timeout) or was tuned with the fault suite."""

    # A join waits this long for its SUBSCRIBE confirmation; past it (Redis down)
    # it completes anyway and the reconnect's re-subscribe and gap check cover it.
    subscribe_wait_s: float = 2.0
    # A `since` replay bigger than this is answered with recovered:false.
    max_replay: int = 5000
    # A slow consumer that has not read its 4000 close after this long is cut.
    slow_abort_s: float = 5.0
    # A gap fill retries history this long before it lets the room go on with the gap.
    fill_give_up_s: float = 30.0
    # Fills run at most this many at once (a Redis reconnect checks every room).
    fill_concurrency: int = 16
    # A worker announces itself ready once connected, or after this long anyway.
    ready_wait_s: float = 30.0
    # A relay revocation waits this long for the batch in flight; past it the
    # group goes on and the batch is not committed (relayed again, dropped by seq).
    relay_revoke_grace_s: float = 2.0
    # Each PUBLISH pipeline and each commit of the relay is bounded, so a batch
    # never holds the member back from a rebalance for long.
    relay_step_timeout_s: float = 5.0


GATEWAY_TIMINGS = GatewayTimings()


@dataclass(frozen=True)
class KafkaTuning:
    """Timings of the chat ingest pipeline's Kafka clients and retries.

    Not user settings: tuned with the fault suite. The session timeout is a
    setting (`kafka_session_timeout_ms`).
    """

    heartbeat_interval_ms: int = 1000
    # A batch takes milliseconds and its revocation waits revoke_grace_s: a
    # member not back within this is gone (and the watchdog's bound, derived
    # from it, stays short).
    rebalance_timeout_ms: int = 6000
    poll_timeout_ms: int = 100  # getmany wait when idle; bounds how fast a stop is seen
    request_timeout_ms: int = 10_000
    revoke_grace_s: float = 3.0  # how long a revocation waits for the in-flight batch
    shutdown_grace_s: float = 5.0  # how long a stop lets a failing batch keep retrying
    retry_initial_s: float = 0.05
    retry_max_s: float = 2.0
    connect_retry_max_s: float = 5.0



Section = TypeVar("Section", GatewayConfig, ChatConfig, DevConfig)

_PREFIXES = {GatewayConfig: "", ChatConfig: "", DevConfig: "DEV_"}
# Variables of the test harness and CI, not settings of a service.
_HARNESS_PREFIXES = (ENV_PREFIX + "TEST_", ENV_PREFIX + "REQUIRE_")


def env_name(section: type, name: str) -> str:
    return ENV_PREFIX + _PREFIXES[section] + name.upper()


def _parse(section: type, f: dataclasses.Field[Any], raw: Any, source: str) -> Any:
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "str": str}[f.type]
    where = f"setting `{f.name}` ({source})"
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{where} is {raw!r}; use true or false")
    if kind in (int, float):
        try:
            value = kind(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} is {raw!r}; use a number{' in ' + f.metadata['unit'] if f.metadata['unit'] else ''}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{where} is {raw!r}; use a finite number")
        if value < 0:
            raise ConfigError(f"{where} is {raw!r}; it cannot be negative")
        return value
    value = str(raw)
    choices = f.metadata["choices"]
    if choices and value not in choices:
        raise ConfigError(f"{where} is {raw!r}; use one of: {', '.join(choices)}")
    return value


def load(section: type[Section], flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Section:
    """Build a config section from flags (None values are unset), the environment and defaults.

    Raises ConfigError for a malformed value or an unknown `ROOMCAST_*` variable
    of this section.
    """
    environ = os.environ if environ is None else environ
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    fields = {f.name: f for f in dataclasses.fields(section)}
    for name in flags:
        if name not in fields:
            raise ConfigError(f"unknown setting `{name}` for {section.__name__}")
    known_env = {env_name(section, n) for n in fields}
    prefix = ENV_PREFIX + _PREFIXES[section]
    other_sections = {env_name(s, f.name) for s in _PREFIXES for f in dataclasses.fields(s)}
    for key in environ:
        if (
            key.startswith(prefix)
            and key not in known_env
            and key not in other_sections
            and not key.startswith(_HARNESS_PREFIXES)
        ):
            close = _closest(key, known_env)
            hint = f"; did you mean {close}?" if close else ""
            raise ConfigError(f"unknown environment variable {key}{hint} (see the configuration reference in README.md)")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name in flags:
            values[name] = _parse(section, f, flags[name], f"--{name.replace('_', '-')}")
        elif env_name(section, name) in environ:
            values[name] = _parse(section, f, environ[env_name(section, name)], env_name(section, name))
    config = section(**values)
    _validate(config)
    return config


def to_environ(config: Any) -> dict[str, str]:
    """The section as `ROOMCAST_*` variables that `load` reads back to an equal section.

    How a supervisor hands its config to worker processes: the environment of
    a process is readable by its user only (/proc/<pid>/environ is 0400),
    while its command line is readable by every local user, so secrets such
    as jwt_secret must never travel as flags.
    """
    section = type(config)
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(config, f.name)
        out[env_name(section, f.name)] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


def _closest(key: str, names: set[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.75)
    return match[0] if match else None


_HOSTPORT = re.compile(r"^[^\s:,]+:\d{1,5}$")


def _validate(config: Any) -> None:
    def bad(name: str, problem: str, fix: str) -> ConfigError:
        return ConfigError(f"setting `{name}` ({env_name(type(config), name)}) {problem}; {fix}")

    for name in ("port", "http_port", "admin_port"):
        value = getattr(config, name, None)
        if value is not None and not 0 <= value <= 65535:
            raise bad(name, f"is {value}", "use a port from 0 to 65535")
    workers = getattr(config, "workers", None)
    if workers is not None and workers < 1:
        raise bad("workers", f"is {workers}", "use 1 or more")
    kafka = getattr(config, "kafka_bootstrap", "")
    if kafka and not all(_HOSTPORT.match(part.strip()) for part in kafka.split(",")):
        raise bad("kafka_bootstrap", f"is {kafka!r}", "use host:port[,host:port]")
    redis_url = getattr(config, "redis_url", None)
    if redis_url is not None and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise bad("redis_url", f"is {redis_url!r}", "use redis://host:port")
    db = getattr(config, "database_url", None)
    if db is not None and not db.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise bad("database_url", f"is {db!r}", "use sqlite:///PATH or postgresql://user@host/db")
    if isinstance(config, (GatewayConfig, ChatConfig)):
        if config.auth_mode == "jwt" and not (config.jwt_secret or config.jwt_public_key):
            raise bad(
                "jwt_secret", "is empty while auth_mode is jwt",
                "set ROOMCAST_JWT_SECRET to the HS256 key (or ROOMCAST_JWT_PUBLIC_KEY for RS256)",
            )
    if isinstance(config, GatewayConfig):
        if config.history_pool_size < 1:
            raise bad("history_pool_size", f"is {config.history_pool_size}", "use 1 or more")
        for name in ("history_timeout_s", "history_connect_timeout_s", "history_keepalive_s"):
            if getattr(config, name) <= 0:
                raise bad(name, f"is {getattr(config, name)}", "use a number of seconds above 0")
        if config.auth_mode == "jwt" and config.history_url and not (config.service_key or config.jwt_secret):
            # RS256 only: the gateway holds no private key to sign with, so
            # every join with `since` and every gap fill would get a 401.
            raise bad(
                "service_key", "is empty while auth_mode is jwt, history_url is set and there is no jwt_secret",
                "set ROOMCAST_SERVICE_KEY, here and on the chat service, to one shared key of 32+ bytes "
                "(python -c 'import secrets; print(secrets.token_urlsafe(32))'), or unset history_url",
            )
        if config.max_body_bytes > config.max_frame_bytes:
            raise bad("max_body_bytes", "is larger than max_frame_bytes", "lower it or raise max_frame_bytes")


def gateway_id(config: GatewayConfig) -> str:
    return config.gateway_id or socket.gethostname()


def settings_table(section: type) -> list[tuple[str, str, Any, str, str]]:
    """(name, env, default, unit, doc) of every setting: feeds the README reference and --help."""
    return [
        (f.name, env_name(section, f.name), f.default, f.metadata["unit"], f.metadata["doc"])
        for f in dataclasses.fields(section)
    ]


def markdown_reference() -> str:
    """The configuration reference of README.md, generated from the sections above."""
    out: list[str] = []
    for section, command in ((GatewayConfig, "roomcast gateway"), (ChatConfig, "roomcast chat"), (DevConfig, "roomcast dev")):
        out.append(f"### `{command}`\n")
        out.append("| flag | environment | default | unit | meaning |")
        out.append("| --- | --- | --- | --- | --- |")
        for name, env, default, unit, doc in settings_table(section):
            shown = f"`{default!r}`" if default != "" else '`""`'
            out.append(f"| `--{name.replace('_', '-')}` | `{env}` | {shown} | {unit} | {doc} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown_reference())
