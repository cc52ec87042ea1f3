"""The gateway's own credential for the chat service's history API.

Why a shared service key, not the user-token keys: with RS256 the gateway
holds only the public key and can sign nothing, so it needs a credential of
its own that works whatever the user tokens' algorithm is. The key never
travels: the gateway sends a short-lived HS256 token signed with it (sub
`gateway:<id>`, exp SERVICE_TOKEN_TTL_S), in its own header so the chat
service never tries it as a user token (nor a user token as a service one).
The signature check is PyJWT's HMAC verify, a constant-time comparison
(hmac.compare_digest).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from roomcast.auth import MIN_HS256_SECRET_BYTES, Authenticator, AuthError, mint, setting_label
from roomcast.config import ConfigError

__all__ = ["SERVICE_TOKEN_HEADER", "SERVICE_TOKEN_TTL_S", "SERVICE_SUB_PREFIX", "ServiceVerifier", "gateway_history_headers"]


SERVICE_TOKEN_HEADER = "X-Roomcast-Service-Token"
"""The header of the gateway's service token on history requests."""

SERVICE_TOKEN_TTL_S = 60.0
"""Lifetime of one service token: a captured one is worthless a minute later."""

SERVICE_SUB_PREFIX = "gateway:"
"""Every service token's `sub` starts with this."""


def _service_key(config: Any) -> str:
    """config.service_key, checked; "" when unset or in dev mode. Raises ConfigError for a short key."""
    key: str = getattr(config, "service_key", "")
    if config.auth_mode != "jwt" or not key:
        return ""
    if len(key.encode()) < MIN_HS256_SECRET_BYTES:
        raise ConfigError(
            f"{setting_label('service_key')} is {len(key.encode())} bytes; it signs HS256 service tokens and needs at "
            f"least {MIN_HS256_SECRET_BYTES} (RFC 7518 section 3.2): generate one with "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))' and give the same to gateways and chat"
        )
    return key


def gateway_history_headers(
    config: Any, gateway_name: str, now: Callable[[], float] = time.time
) -> Callable[[], dict[str, str]] | None:
    """The headers that authenticate one history request of the gateway, minted afresh per call.

    `config` is a GatewayConfig. None in dev mode (history is open). In jwt
    mode: a service token signed with service_key; without one, the older
    `Authorization: Bearer` token signed with jwt_secret (HS256 deployments
    keep working unchanged). Raises ConfigError, naming service_key, for a
    short key, or when neither key is there (RS256-only settings).
    """
    if config.auth_mode != "jwt":
        return None
    sub = SERVICE_SUB_PREFIX + gateway_name
    key = _service_key(config)
    if key:
        return lambda: {SERVICE_TOKEN_HEADER: mint(key, sub, ttl_s=SERVICE_TOKEN_TTL_S, now=now)}
    secret = config.jwt_secret
    if secret:
        return lambda: {"Authorization": "Bearer " + mint(secret, sub, ttl_s=SERVICE_TOKEN_TTL_S, now=now)}
    raise ConfigError(
        f"{setting_label('service_key')} is empty and there is no jwt_secret (RS256 only): the gateway cannot "
        "authenticate to the history API; set ROOMCAST_SERVICE_KEY here and on the chat service to one shared "
        "key of 32+ bytes"
    )


class ServiceVerifier:
    """The chat service's check of a gateway's service token (SERVICE_TOKEN_HEADER).

    Build with `from_config` at start-up; `verify` per request.
    """

    def __init__(self, service_key: str, now: Callable[[], float] = time.time) -> None:
        # HS256 with the service key only: a user token (jwt_secret or RS256)
        # sent in the service header fails its signature check.
        self._tokens = Authenticator("jwt", jwt_secret=service_key, now=now)

    @classmethod
    def from_config(cls, config: Any, now: Callable[[], float] = time.time) -> ServiceVerifier | None:
        """From a ChatConfig: None when service_key is unset or in dev mode. Raises ConfigError for a short key."""
        key = _service_key(config)
        return cls(key, now) if key else None

    def verify(self, token: str) -> str:
        """The gateway's name (`sub` without its prefix). Raises AuthError: the message is the 401 body."""
        identity = self._tokens.authenticate({"Authorization": "Bearer " + token}, "")
        if not identity.user.startswith(SERVICE_SUB_PREFIX) or identity.rooms is not None:
            raise AuthError("service token sub must be gateway:<id>, with no rooms claim")
        return identity.user.removeprefix(SERVICE_SUB_PREFIX)
