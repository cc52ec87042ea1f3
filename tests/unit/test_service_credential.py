"""The gateway's service credential for the history API (roomcast.service_auth, config validation): pure, no network."""

from __future__ import annotations

from dataclasses import replace

import pytest

from roomcast.auth import Authenticator, AuthError, mint
from roomcast.service_auth import SERVICE_TOKEN_HEADER, ServiceVerifier, gateway_history_headers
from roomcast.config import ChatConfig, ConfigError, GatewayConfig, load

KEY = "service-key-of-the-test-at-least-32-bytes"
SECRET = "user-token-secret-at-least-32-bytes!!"
NOW = 1_800_000_000.0
# Any RSA public key will do for the settings checks: none of them verify a token with it.
PUBLIC_KEY = "-----BEGIN PUBLIC KEY-----\nnot parsed by config validation\n-----END PUBLIC KEY-----"


def rs256_gateway(**over: object) -> GatewayConfig:
    return replace(GatewayConfig(auth_mode="jwt", jwt_public_key=PUBLIC_KEY, history_url="http://chat:8081/"), **over)  # type: ignore[arg-type]


def test_the_gateway_s_service_token_is_accepted_and_names_the_gateway() -> None:
    headers = gateway_history_headers(rs256_gateway(service_key=KEY), "gw-a-0", now=lambda: NOW)
    assert headers is not None
    sent = headers()
    assert list(sent) == [SERVICE_TOKEN_HEADER]
    verifier = ServiceVerifier(KEY, now=lambda: NOW + 30)
    assert verifier.verify(sent[SERVICE_TOKEN_HEADER]) == "gw-a-0"


def test_a_token_of_another_key_is_refused() -> None:
    verifier = ServiceVerifier(KEY, now=lambda: NOW)
    forged = mint("another-service-key-of-at-least-32-bytes", "gateway:gw", now=lambda: NOW)
    with pytest.raises(AuthError, match="signature"):
        verifier.verify(forged)


def test_an_expired_service_token_is_refused() -> None:
    token = mint(KEY, "gateway:gw", ttl_s=60, now=lambda: NOW)
    with pytest.raises(AuthError, match="expired"):
        ServiceVerifier(KEY, now=lambda: NOW + 3600).verify(token)


@pytest.mark.parametrize("sub, rooms", [("alice", None), ("gateway:gw", ["r1"])])
def test_a_user_shaped_token_signed_with_the_service_key_is_no_service_token(sub: str, rooms: list[str] | None) -> None:
    token = mint(KEY, sub, rooms=rooms, now=lambda: NOW)
    with pytest.raises(AuthError, match="gateway:<id>"):
        ServiceVerifier(KEY, now=lambda: NOW).verify(token)


def test_without_a_service_key_the_gateway_falls_back_to_a_jwt_secret_bearer_token() -> None:
    config = GatewayConfig(auth_mode="jwt", jwt_secret=SECRET, history_url="http://chat:8081/")
    headers = gateway_history_headers(config, "gw-0", now=lambda: NOW)
    assert headers is not None
    value = headers()["Authorization"]
    identity = Authenticator("jwt", SECRET, now=lambda: NOW).authenticate({"Authorization": value}, "")
    assert identity.user == "gateway:gw-0"


def test_dev_mode_sends_no_credential_and_accepts_none() -> None:
    assert gateway_history_headers(GatewayConfig(service_key=KEY), "gw-0") is None
    assert ServiceVerifier.from_config(ChatConfig(service_key=KEY)) is None


def test_rs256_only_without_a_service_key_cannot_authenticate_and_says_which_setting() -> None:
    with pytest.raises(ConfigError, match=r"`service_key` \(ROOMCAST_SERVICE_KEY\)"):
        gateway_history_headers(rs256_gateway(), "gw-0")


def test_loading_rs256_only_settings_with_history_and_no_service_key_stops_start_up() -> None:
    environ = {
        "ROOMCAST_AUTH_MODE": "jwt",
        "ROOMCAST_JWT_PUBLIC_KEY": PUBLIC_KEY,
        "ROOMCAST_HISTORY_URL": "http://chat:8081/",
    }
    with pytest.raises(ConfigError, match=r"`service_key` \(ROOMCAST_SERVICE_KEY\).*set ROOMCAST_SERVICE_KEY"):
        load(GatewayConfig, environ=environ)
    # Either way out is accepted: a service key, or no history.
    assert load(GatewayConfig, environ=dict(environ, ROOMCAST_SERVICE_KEY=KEY)).service_key == KEY
    assert load(GatewayConfig, environ={k: v for k, v in environ.items() if k != "ROOMCAST_HISTORY_URL"})


def test_a_short_service_key_is_refused_on_both_sides() -> None:
    with pytest.raises(ConfigError, match=r"`service_key`.*at least 32"):
        gateway_history_headers(rs256_gateway(service_key="short"), "gw-0")
    with pytest.raises(ConfigError, match=r"`service_key`.*at least 32"):
        ServiceVerifier.from_config(ChatConfig(auth_mode="jwt", jwt_secret=SECRET, service_key="short"))


def test_history_pool_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="history_pool_size"):
        load(GatewayConfig, environ={"ROOMCAST_HISTORY_POOL_SIZE": "0"})
    with pytest.raises(ConfigError, match="history_timeout_s"):
        load(GatewayConfig, environ={"ROOMCAST_HISTORY_TIMEOUT_S": "0"})
    assert load(GatewayConfig, environ={"ROOMCAST_HISTORY_POOL_SIZE": "4"}).history_pool_size == 4


def test_service_tokens_are_minted_afresh_per_request() -> None:
    clock = [NOW]
    headers = gateway_history_headers(rs256_gateway(service_key=KEY), "gw-0", now=lambda: clock[0])
    assert headers is not None
    first = headers()[SERVICE_TOKEN_HEADER]
    clock[0] += 120  # past the first one's exp
    second = headers()[SERVICE_TOKEN_HEADER]
    assert ServiceVerifier(KEY, now=lambda: clock[0]).verify(second) == "gw-0"
    with pytest.raises(AuthError, match="expired"):
        ServiceVerifier(KEY, now=lambda: clock[0]).verify(first)
