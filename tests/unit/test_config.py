"""Settings: defaults, precedence, and loud errors for anything wrong (roomcast/config.py)."""

from __future__ import annotations

import dataclasses

import pytest

from roomcast import config as config_module
from roomcast.config import ChatConfig, ConfigError, DevConfig, GatewayConfig, load, settings_table, to_environ


def refused(section, *, flags=None, environ=None) -> str:
    with pytest.raises(ConfigError) as info:
        load(section, flags=flags, environ=environ if environ is not None else {})
    return str(info.value)


# ---- defaults ----------------------------------------------------------------------


def test_gateway_defaults_without_flags_or_environment():
    c = load(GatewayConfig, environ={})
    assert c == GatewayConfig()
    assert (c.host, c.port, c.workers) == ("0.0.0.0", 8080, 1)
    assert c.redis_url == "redis://127.0.0.1:6379"
    assert c.auth_mode == "dev"
    assert c.max_frame_bytes == 64 * 1024  # PROTOCOL.md 3: 1009 over 64 KiB by default
    assert c.max_body_bytes == 4096  # PROTOCOL.md 3: too_large over 4096 bytes by default
    assert c.send_rate_per_s == 20.0 and c.send_burst == 40
    assert c.abuse_max_errors == 30 and c.abuse_window_ms == 10_000
    assert c.test_echo_route is False
    assert c.log_level == "info"


def test_chat_defaults_without_flags_or_environment():
    c = load(ChatConfig, environ={})
    assert c == ChatConfig()
    assert c.kafka_bootstrap == "127.0.0.1:9092"
    assert c.database_url == "sqlite:///roomcast.db"
    assert c.http_port == 8081


def test_dev_defaults_without_flags_or_environment():
    c = load(DevConfig, environ={})
    assert c == DevConfig()
    assert (c.host, c.port, c.workers) == ("127.0.0.1", 8080, 2)


def test_config_sections_are_frozen():
    c = load(GatewayConfig, environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.port = 1  # type: ignore[misc]


@pytest.mark.parametrize("section", [GatewayConfig, ChatConfig, DevConfig])
def test_every_setting_documents_itself(section):
    rows = settings_table(section)
    assert [r[0] for r in rows] == [f.name for f in dataclasses.fields(section)]
    for name, env, default, unit, doc in rows:
        assert env.startswith("ROOMCAST_") and env.endswith(name.upper())
        assert doc, f"{name} has no doc"
        assert default == getattr(section(), name)


def test_dev_settings_have_their_own_env_prefix():
    envs = {row[1] for row in settings_table(DevConfig)}
    assert "ROOMCAST_DEV_PORT" in envs and "ROOMCAST_DEV_WORKERS" in envs


def test_gateway_id_defaults_to_the_hostname(monkeypatch):
    monkeypatch.setattr(config_module.socket, "gethostname", lambda: "box-7")
    assert config_module.gateway_id(load(GatewayConfig, environ={})) == "box-7"
    assert config_module.gateway_id(load(GatewayConfig, environ={"ROOMCAST_GATEWAY_ID": "gw-2"})) == "gw-2"


# ---- precedence: flags over env over defaults -------------------------------------


def test_environment_overrides_default():
    assert load(GatewayConfig, environ={"ROOMCAST_PORT": "9000"}).port == 9000


def test_flag_overrides_environment():
    c = load(GatewayConfig, flags={"port": 9100}, environ={"ROOMCAST_PORT": "9000"})
    assert c.port == 9100


def test_flag_overrides_default():
    assert load(GatewayConfig, flags={"workers": 4}, environ={}).workers == 4


def test_flag_of_none_counts_as_unset():
    c = load(GatewayConfig, flags={"port": None, "workers": None}, environ={"ROOMCAST_PORT": "9000"})
    assert c.port == 9000
    assert c.workers == 1


def test_precedence_is_per_setting():
    c = load(
        GatewayConfig,
        flags={"port": 9100},
        environ={"ROOMCAST_PORT": "9000", "ROOMCAST_WORKERS": "3"},
    )
    assert (c.port, c.workers, c.host) == (9100, 3, "0.0.0.0")


def test_load_reads_the_process_environment_by_default(monkeypatch):
    for key in [k for k in __import__("os").environ if k.startswith("ROOMCAST_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("ROOMCAST_PORT", "9300")
    assert load(GatewayConfig).port == 9300


def test_dev_section_reads_dev_prefixed_variables():
    c = load(DevConfig, environ={"ROOMCAST_DEV_PORT": "9400", "ROOMCAST_PORT": "1"})
    assert c.port == 9400


@pytest.mark.parametrize(
    "raw, expected",
    [("1", True), ("true", True), ("TRUE", True), (" yes ", True), ("on", True),
     ("0", False), ("false", False), ("No", False), ("off", False), ("", False)],
)
def test_booleans_parse_from_the_usual_words(raw, expected):
    assert load(GatewayConfig, environ={"ROOMCAST_TEST_ECHO_ROUTE": raw}).test_echo_route is expected


def test_boolean_flag_is_taken_as_is():
    assert load(GatewayConfig, flags={"test_echo_route": True}, environ={}).test_echo_route is True


def test_float_setting_accepts_an_integer():
    c = load(GatewayConfig, environ={"ROOMCAST_SEND_RATE_PER_S": "5"})
    assert c.send_rate_per_s == 5.0 and isinstance(c.send_rate_per_s, float)


def test_string_choice_within_choices_is_accepted():
    c = load(GatewayConfig, environ={"ROOMCAST_LOG_LEVEL": "debug", "ROOMCAST_AUTH_MODE": "jwt", "ROOMCAST_JWT_SECRET": "s"})
    assert (c.log_level, c.auth_mode, c.jwt_secret) == ("debug", "jwt", "s")


def test_kafka_bootstrap_accepts_a_list_of_host_ports():
    c = load(GatewayConfig, environ={"ROOMCAST_KAFKA_BOOTSTRAP": "k1:9092, k2:9093"})
    assert c.kafka_bootstrap == "k1:9092, k2:9093"


@pytest.mark.parametrize("url", ["redis://h:1", "rediss://h:1", "unix:///tmp/redis.sock"])
def test_redis_url_accepts_redis_schemes(url):
    assert load(GatewayConfig, environ={"ROOMCAST_REDIS_URL": url}).redis_url == url


@pytest.mark.parametrize("url", ["sqlite:///x.db", "postgresql://u@h/db", "postgres://u@h/db"])
def test_database_url_accepts_sqlite_and_postgres(url):
    assert load(ChatConfig, environ={"ROOMCAST_DATABASE_URL": url}).database_url == url


# ---- unknown settings are refused ---------------------------------------------------


def test_unknown_environment_variable_is_refused_with_did_you_mean():
    message = refused(GatewayConfig, environ={"ROOMCAST_PROT": "9000"})
    assert "ROOMCAST_PROT" in message
    assert "did you mean ROOMCAST_PORT?" in message


def test_misspelt_long_name_gets_did_you_mean():
    message = refused(GatewayConfig, environ={"ROOMCAST_MAX_BODY_BYTE": "100"})
    assert "did you mean ROOMCAST_MAX_BODY_BYTES?" in message


def test_unknown_dev_variable_is_refused_with_did_you_mean():
    message = refused(DevConfig, environ={"ROOMCAST_DEV_WORKRS": "2"})
    assert "ROOMCAST_DEV_WORKRS" in message and "did you mean ROOMCAST_DEV_WORKERS?" in message


def test_unknown_variable_far_from_any_name_is_refused_without_a_guess():
    message = refused(GatewayConfig, environ={"ROOMCAST_ZZZZZZZZZZZZ": "1"})
    assert "ROOMCAST_ZZZZZZZZZZZZ" in message
    assert "did you mean" not in message


def test_variables_of_other_sections_are_not_refused():
    environ = {"ROOMCAST_DATABASE_URL": "sqlite:///x.db", "ROOMCAST_HTTP_PORT": "1", "ROOMCAST_DEV_WORKERS": "3"}
    assert load(GatewayConfig, environ=environ).port == 8080
    assert load(ChatConfig, environ={"ROOMCAST_JWT_SECRET": "s", "ROOMCAST_DEV_PORT": "1"}).http_port == 8081


def test_test_harness_variables_are_not_refused():
    assert load(GatewayConfig, environ={"ROOMCAST_TEST_TIMEOUT_FACTOR": "3"}).port == 8080
    assert load(GatewayConfig, environ={"ROOMCAST_REQUIRE_BROWSER": "1"}).port == 8080


def test_variables_without_the_prefix_are_ignored():
    assert load(GatewayConfig, environ={"PORT": "1", "ROOMCASTPORT": "2", "HOME": "/root"}).port == 8080


def test_unknown_flag_is_refused_naming_it():
    message = refused(GatewayConfig, flags={"prot": 9000})
    assert "prot" in message


# ---- malformed values: the message names the setting and the fix -----------------


def assert_names_setting_and_fix(message: str, name: str, env: str, fix: str) -> None:
    assert f"`{name}`" in message, message
    assert env in message, message
    assert fix in message, message


@pytest.mark.parametrize(
    "env, raw, name, fix",
    [
        ("ROOMCAST_PORT", "http", "port", "use a number"),
        ("ROOMCAST_PORT", "80.5", "port", "use a number"),
        ("ROOMCAST_PORT", "", "port", "use a number"),
        ("ROOMCAST_MAX_FRAME_BYTES", "64k", "max_frame_bytes", "use a number in bytes"),
        ("ROOMCAST_ABUSE_WINDOW_MS", "10s", "abuse_window_ms", "use a number in ms"),
        ("ROOMCAST_SEND_RATE_PER_S", "fast", "send_rate_per_s", "use a number in 1/s"),
        ("ROOMCAST_PING_INTERVAL_S", "20s", "ping_interval_s", "use a number in s"),
    ],
)
def test_malformed_number_is_refused_naming_setting_and_fix(env, raw, name, fix):
    message = refused(GatewayConfig, environ={env: raw})
    assert_names_setting_and_fix(message, name, env, fix)
    assert repr(raw) in message


@pytest.mark.parametrize("env, name", [("ROOMCAST_PORT", "port"), ("ROOMCAST_SEND_BURST", "send_burst"), ("ROOMCAST_SEND_RATE_PER_S", "send_rate_per_s")])
def test_negative_number_is_refused(env, name):
    message = refused(GatewayConfig, environ={env: "-1"})
    assert_names_setting_and_fix(message, name, env, "cannot be negative")


@pytest.mark.parametrize("raw", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_non_finite_number_is_refused(raw):
    # NaN would pass a `< 0` check and disable the rate limit (min(burst, nan) == burst).
    message = refused(GatewayConfig, environ={"ROOMCAST_SEND_RATE_PER_S": raw})
    assert_names_setting_and_fix(message, "send_rate_per_s", "ROOMCAST_SEND_RATE_PER_S", "number")
    assert repr(raw) in message


def test_malformed_flag_names_the_flag():
    message = refused(GatewayConfig, flags={"port": "http"})
    assert "`port`" in message and "--port" in message and "use a number" in message


@pytest.mark.parametrize("raw", ["maybe", "2", "yes please", "t"])
def test_malformed_boolean_is_refused(raw):
    message = refused(GatewayConfig, environ={"ROOMCAST_TEST_ECHO_ROUTE": raw})
    assert_names_setting_and_fix(message, "test_echo_route", "ROOMCAST_TEST_ECHO_ROUTE", "use true or false")


@pytest.mark.parametrize(
    "env, raw, name, fix",
    [
        ("ROOMCAST_AUTH_MODE", "oauth", "auth_mode", "use one of: dev, jwt"),
        ("ROOMCAST_LOG_LEVEL", "verbose", "log_level", "use one of: debug, info, warning, error"),
    ],
)
def test_value_outside_choices_is_refused_listing_them(env, raw, name, fix):
    assert_names_setting_and_fix(refused(GatewayConfig, environ={env: raw}), name, env, fix)


def test_chat_log_level_outside_choices_is_refused():
    message = refused(ChatConfig, environ={"ROOMCAST_LOG_LEVEL": "loud"})
    assert_names_setting_and_fix(message, "log_level", "ROOMCAST_LOG_LEVEL", "use one of")


@pytest.mark.parametrize("raw", ["65536", "70000"])
def test_port_out_of_range_is_refused(raw):
    message = refused(GatewayConfig, environ={"ROOMCAST_PORT": raw})
    assert_names_setting_and_fix(message, "port", "ROOMCAST_PORT", "use a port from 0 to 65535")


def test_port_at_the_range_ends_is_accepted():
    assert load(GatewayConfig, environ={"ROOMCAST_PORT": "65535"}).port == 65535
    assert load(GatewayConfig, environ={"ROOMCAST_PORT": "0"}).port == 0


def test_chat_http_port_out_of_range_is_refused():
    message = refused(ChatConfig, environ={"ROOMCAST_HTTP_PORT": "99999"})
    assert_names_setting_and_fix(message, "http_port", "ROOMCAST_HTTP_PORT", "use a port from 0 to 65535")


def test_zero_workers_is_refused():
    assert_names_setting_and_fix(refused(GatewayConfig, environ={"ROOMCAST_WORKERS": "0"}), "workers", "ROOMCAST_WORKERS", "use 1 or more")


def test_zero_dev_workers_is_refused_naming_the_dev_variable():
    message = refused(DevConfig, environ={"ROOMCAST_DEV_WORKERS": "0"})
    assert_names_setting_and_fix(message, "workers", "ROOMCAST_DEV_WORKERS", "use 1 or more")


@pytest.mark.parametrize("raw", ["localhost", "k1:9092,k2", "k1:port", "k 1:9092", "http://k1:9092"])
def test_malformed_kafka_bootstrap_is_refused(raw):
    message = refused(GatewayConfig, environ={"ROOMCAST_KAFKA_BOOTSTRAP": raw})
    assert_names_setting_and_fix(message, "kafka_bootstrap", "ROOMCAST_KAFKA_BOOTSTRAP", "use host:port[,host:port]")


def test_malformed_chat_kafka_bootstrap_is_refused():
    message = refused(ChatConfig, environ={"ROOMCAST_KAFKA_BOOTSTRAP": "kafka"})
    assert_names_setting_and_fix(message, "kafka_bootstrap", "ROOMCAST_KAFKA_BOOTSTRAP", "use host:port")


@pytest.mark.parametrize("raw", ["http://h:6379", "127.0.0.1:6379", ""])
def test_malformed_redis_url_is_refused(raw):
    message = refused(GatewayConfig, environ={"ROOMCAST_REDIS_URL": raw})
    assert_names_setting_and_fix(message, "redis_url", "ROOMCAST_REDIS_URL", "use redis://host:port")


@pytest.mark.parametrize("raw", ["mysql://h/db", "roomcast.db", "sqlite://x.db"])
def test_malformed_database_url_is_refused(raw):
    message = refused(ChatConfig, environ={"ROOMCAST_DATABASE_URL": raw})
    assert_names_setting_and_fix(message, "database_url", "ROOMCAST_DATABASE_URL", "use sqlite:///PATH or postgresql://")


def test_jwt_mode_without_secret_is_refused():
    message = refused(GatewayConfig, environ={"ROOMCAST_AUTH_MODE": "jwt"})
    assert_names_setting_and_fix(message, "jwt_secret", "ROOMCAST_JWT_SECRET", "set ROOMCAST_JWT_SECRET")


def test_chat_jwt_mode_without_secret_is_refused():
    message = refused(ChatConfig, environ={"ROOMCAST_AUTH_MODE": "jwt"})
    assert_names_setting_and_fix(message, "jwt_secret", "ROOMCAST_JWT_SECRET", "set ROOMCAST_JWT_SECRET")


@pytest.mark.parametrize("section", [GatewayConfig, ChatConfig])
def test_jwt_mode_with_only_a_public_key_is_accepted(section):
    c = load(section, environ={"ROOMCAST_AUTH_MODE": "jwt", "ROOMCAST_JWT_PUBLIC_KEY": "@/etc/roomcast/jwt.pem"})
    assert c.auth_mode == "jwt" and c.jwt_secret == ""


@pytest.mark.parametrize(
    "env, raw, name, fix",
    [
        ("ROOMCAST_REDIS_MODE", "sentinel", "redis_mode", "use one of: plain, cluster"),
        ("ROOMCAST_LOG_FORMAT", "xml", "log_format", "use one of: text, json"),
    ],
)
def test_newer_choice_settings_refuse_values_outside_their_choices(env, raw, name, fix):
    assert_names_setting_and_fix(refused(GatewayConfig, environ={env: raw}), name, env, fix)


def test_admin_port_out_of_range_is_refused():
    message = refused(GatewayConfig, environ={"ROOMCAST_ADMIN_PORT": "70000"})
    assert_names_setting_and_fix(message, "admin_port", "ROOMCAST_ADMIN_PORT", "use a port from 0 to 65535")


def test_body_limit_above_frame_limit_is_refused():
    message = refused(GatewayConfig, environ={"ROOMCAST_MAX_BODY_BYTES": "70000"})
    assert_names_setting_and_fix(message, "max_body_bytes", "ROOMCAST_MAX_BODY_BYTES", "raise max_frame_bytes")


def test_body_limit_equal_to_frame_limit_is_accepted():
    c = load(GatewayConfig, environ={"ROOMCAST_MAX_BODY_BYTES": "1000", "ROOMCAST_MAX_FRAME_BYTES": "1000"})
    assert c.max_body_bytes == c.max_frame_bytes == 1000


def test_validation_also_applies_to_flags():
    message = refused(GatewayConfig, flags={"workers": 0})
    assert "`workers`" in message and "use 1 or more" in message



@pytest.mark.parametrize("section", [GatewayConfig, ChatConfig, DevConfig])
def test_to_environ_reads_back_to_the_same_section(section):
    # Every field off its default, so a setting to_environ forgets shows up.
    changed = {}
    for f in dataclasses.fields(section):
        if f.type in (bool, "bool"):
            changed[f.name] = not f.default
        elif f.metadata["choices"]:
            changed[f.name] = next(c for c in f.metadata["choices"] if c != f.default)
        elif f.type in (int, "int"):
            changed[f.name] = f.default + 1
        elif f.type in (float, "float"):
            changed[f.name] = f.default + 0.5
        elif f.name in ("jwt_secret", "instance_id"):
            changed[f.name] = "x" * 40
    config = load(section, changed)
    assert load(section, environ=to_environ(config)) == config
    assert any(getattr(config, f.name) != f.default for f in dataclasses.fields(section))
