"""Who a client is: JWT verification at the WebSocket upgrade and the history API.

Pure: no network I/O and no hidden clock (the clock is passed in). Called by
the gateway once per upgrade (`Authenticator.authenticate`) and by the chat
service once per history request; `Identity.may_use` runs on every join and
send, so it is built for speed.

PROTOCOL.md section 1:

- the token comes in an `Authorization: Bearer <JWT>` header, or in a
  `?token=<JWT>` query parameter (browsers cannot set headers); the header
  wins when both are sent;
- HS256 with `jwt_secret`; RS256 too when `jwt_public_key` is set; no other
  algorithm, never `none`;
- claims: `sub` (user id, required), `exp` (required), `rooms` (optional list
  of room ids or glob patterns such as `team-*`; absent means every room);
- dev mode: no token, `?user=<name>` names the user, default `anon-<n>`;
- a missing, bad or expired token is refused at the upgrade with HTTP 401 and
  a short text body: the message of `AuthError`.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import functools
import itertools
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt.algorithms import HMACAlgorithm, RSAAlgorithm

from roomcast.config import ENV_PREFIX, ConfigError

__all__ = [
    "AuthError",
    "Authenticator",
    "Identity",
    "mint",
    "DEFAULT_LEEWAY_S",
    "MAX_USER_CHARS",
    "MIN_HS256_SECRET_BYTES",
    "MIN_RSA_KEY_BITS",
    "setting_label",
]

DEFAULT_LEEWAY_S = 5.0
"""Clock skew allowed on `exp` and `nbf` between the token's issuer and us, in seconds."""

MAX_USER_CHARS = 128
"""Longest user id: a longer `?user=` is cut to this; a longer `sub` is refused."""

MIN_HS256_SECRET_BYTES = 32
"""RFC 7518 section 3.2: an HS256 key MUST be at least as long as the hash output (256 bits)."""

MIN_RSA_KEY_BITS = 2048
"""RFC 7518 section 3.3: RS256 keys MUST be 2048 bits or larger."""

_ABSENT: Any = object()

_MISSING_TOKEN = "missing token: send Authorization: Bearer <token> or ?token="

# A pattern is an entry with a glob metacharacter (fnmatch syntax); anything
# else is an exact room id, checked with one set lookup.
_GLOB_CHARS = frozenset("*?[")

# Results of pattern matching kept per Identity. Room ids are at most 128
# characters (PROTOCOL.md section 1), so the cache is at most ~40 KiB; when
# full it is emptied, which is cheaper than LRU bookkeeping on every call.
_MAX_CACHED_ROOMS = 256


class AuthError(Exception):
    """A client could not be authenticated. The message is short and safe to send to it."""


@dataclass(frozen=True)
class Identity:
    """An authenticated user and the rooms it may join and send to.

    `rooms` is None for every room; otherwise each entry is an exact room id or
    an fnmatch-style glob (`*`, `?`, `[...]`, case-sensitive). An empty tuple
    means no room at all.
    """

    user: str
    rooms: tuple[str, ...] | None = None
    exp: float | None = field(default=None, compare=False)
    """The token's `exp` (seconds since the epoch); None in dev mode."""
    issued_at: float | None = field(default=None, compare=False)
    """The token's `iat`, if it has one: a revocation refuses tokens issued at or before it."""
    _exact: frozenset[str] = field(init=False, repr=False, compare=False)
    _match: Callable[[str], Any] | None = field(init=False, repr=False, compare=False)
    _cache: dict[str, bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rooms = self.rooms
        if rooms is not None and not isinstance(rooms, tuple):
            rooms = tuple(rooms)
            object.__setattr__(self, "rooms", rooms)
        exact: set[str] = set()
        patterns: list[str] = []
        for entry in rooms or ():
            if _GLOB_CHARS.intersection(entry):
                patterns.append(entry)
            else:
                exact.add(entry)
        object.__setattr__(self, "_exact", frozenset(exact))
        object.__setattr__(self, "_match", _compile(tuple(patterns)) if patterns else None)
        object.__setattr__(self, "_cache", {})

    def may_use(self, room: str) -> bool:
        """Whether this user may join `room` and send to it. Call on every join and send; never raises."""
        if self.rooms is None or room in self._exact:
            return True
        match = self._match
        if match is None:
            return False
        cache = self._cache
        allowed = cache.get(room)
        if allowed is None:
            allowed = match(room) is not None
            if len(cache) >= _MAX_CACHED_ROOMS:
                cache.clear()
            cache[room] = allowed
        return allowed


@functools.lru_cache(maxsize=1024)
def _compile(patterns: tuple[str, ...]) -> Callable[[str], Any]:
    # One alternation of the translated patterns: a single C-level match per
    # room whatever the number of patterns. fnmatch.translate gives exactly
    # the fnmatchcase semantics (anchored; `*` matches any run of characters).
    # Cached because every token of a deployment tends to carry the same few
    # pattern lists.
    return re.compile("|".join(fnmatch.translate(p) for p in patterns)).match


class _HS256(HMACAlgorithm):
    """HS256 with the key checks done once, in Authenticator's constructor, not on every token.

    PyJWT's prepare_key refuses PEM-looking secrets (algorithm confusion) with
    two regex scans, and check_key_length warns about short secrets on every
    call; the constructor runs the stock prepare_key once and from_config
    enforces the length.
    """

    def __init__(self) -> None:
        super().__init__(HMACAlgorithm.SHA256)

    def prepare_key(self, key: str | bytes) -> bytes:
        return key if isinstance(key, bytes) else super().prepare_key(key)

    def check_key_length(self, key: bytes) -> str | None:
        return None


class _RS256(RSAAlgorithm):
    """RS256 without PyJWT's per-call key-size warning: the size is checked once, in the constructor."""

    def __init__(self) -> None:
        super().__init__(RSAAlgorithm.SHA256)

    def check_key_length(self, key: Any) -> str | None:
        return None


def _jws(algorithms: Sequence[str]) -> jwt.PyJWS:
    """A private PyJWS that knows only the given algorithms (and so never `none`)."""
    jws = jwt.PyJWS(algorithms=[])
    for name in algorithms:
        jws.register_algorithm(name, _HS256() if name == "HS256" else _RS256())
    return jws


_MINT_JWS = _jws(["HS256"])


def setting_label(name: str) -> str:
    """How an error message names a setting: `name` and its environment variable."""
    return f"setting `{name}` ({ENV_PREFIX}{name.upper()})"


def _load_public_key(pem: str) -> RSAPublicKey:
    """Parse an RSA public key in PEM. Raises ConfigError naming jwt_public_key."""
    text = pem.strip()
    if "\\n" in text and "\n" not in text:
        # A PEM pasted into one environment variable line with literal "\n".
        text = text.replace("\\n", "\n")
    if "PRIVATE KEY" in text:
        raise ConfigError(
            f"{setting_label('jwt_public_key')} holds a private key; give the public key only "
            "(openssl rsa -in key.pem -pubout)"
        )
    try:
        key = load_pem_public_key(text.encode())
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{setting_label('jwt_public_key')} is not a PEM public key ({exc}); "
            "give -----BEGIN PUBLIC KEY----- text or @path to a file holding it"
        ) from None
    if not isinstance(key, RSAPublicKey):
        raise ConfigError(
            f"{setting_label('jwt_public_key')} is a {type(key).__name__}, not an RSA key; RS256 needs an RSA public key"
        )
    if key.key_size < MIN_RSA_KEY_BITS:
        raise ConfigError(
            f"{setting_label('jwt_public_key')} is a {key.key_size}-bit RSA key; "
            f"RS256 needs {MIN_RSA_KEY_BITS} bits or more (RFC 7518 section 3.3)"
        )
    return key


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Authenticator:
    """Turns the credentials of an upgrade or history request into an Identity.

    Build one per process at start-up, preferably with `from_config`, and call
    `authenticate` for each request. The constructor raises ConfigError for a
    bad mode or key; `from_config` also resolves `@path` keys and refuses an
    HS256 secret shorter than 32 bytes.
    """

    def __init__(
        self,
        auth_mode: str,
        jwt_secret: str = "",
        jwt_public_key: str = "",
        now: Callable[[], float] = time.time,
        *,
        leeway_s: float = DEFAULT_LEEWAY_S,
    ) -> None:
        if auth_mode not in ("dev", "jwt"):
            raise ConfigError(f"{setting_label('auth_mode')} is {auth_mode!r}; use one of: dev, jwt")
        self.auth_mode = auth_mode
        self._now = now
        self._leeway_s = leeway_s
        # Dev names: a random start makes the gateway workers of `roomcast dev`
        # (separate processes, no shared counter) unlikely to hand out the same
        # anon-<n>; the counter makes them unique within a process.
        self._anon = itertools.count(secrets.randbelow(900_000) + 100_000)
        self._keys: dict[str, bytes | RSAPublicKey] = {}
        if auth_mode == "jwt":
            if jwt_secret:
                try:
                    self._keys["HS256"] = HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(jwt_secret)
                except jwt.InvalidKeyError:
                    raise ConfigError(
                        f"{setting_label('jwt_secret')} looks like a PEM or SSH key; it is the shared HS256 "
                        "secret (put an RSA public key in ROOMCAST_JWT_PUBLIC_KEY instead)"
                    ) from None
            if jwt_public_key:
                self._keys["RS256"] = _load_public_key(jwt_public_key)
            if not self._keys:
                raise ConfigError(
                    f"{setting_label('jwt_secret')} is empty while auth_mode is jwt; set ROOMCAST_JWT_SECRET "
                    "to the HS256 key (or ROOMCAST_JWT_PUBLIC_KEY for RS256)"
                )
        self.algorithms: tuple[str, ...] = tuple(self._keys)
        self._jws = _jws(self.algorithms)
        self._refused_alg = f"token algorithm is not accepted; use {' or '.join(self.algorithms) or 'none'}"
        # Header segment -> alg. Nearly every token of a deployment has the
        # same header, so this saves a base64 and JSON decode per upgrade.
        # Only a hint for picking the key: PyJWS checks the header again,
        # with the allow-list, before trusting the signature.
        self._alg_of_header: dict[str, Any] = {}

    @classmethod
    def from_config(cls, config: Any, now: Callable[[], float] = time.time) -> Authenticator:
        """Build from a GatewayConfig or ChatConfig (anything with auth_mode, jwt_secret, jwt_public_key).

        Call once at start-up. Raises ConfigError, naming the setting and the
        fix, when a `@path` key file cannot be read, a key is malformed, or the
        HS256 secret is shorter than 32 bytes (RFC 7518 section 3.2).
        """
        secret: str = config.jwt_secret
        public_key: str = config.jwt_public_key
        if config.auth_mode == "jwt":
            if secret and len(secret.encode()) < MIN_HS256_SECRET_BYTES:
                raise ConfigError(
                    f"{setting_label('jwt_secret')} is {len(secret.encode())} bytes; HS256 needs at least "
                    f"{MIN_HS256_SECRET_BYTES} (RFC 7518 section 3.2): generate one with "
                    "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
                )
            if public_key.startswith("@"):
                path = public_key[1:]
                try:
                    with open(path, encoding="ascii") as f:
                        public_key = f.read()
                except (OSError, UnicodeDecodeError) as exc:
                    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                    raise ConfigError(
                        f"{setting_label('jwt_public_key')} names {path!r}, which cannot be read ({reason}); "
                        "fix the path or its permissions, or give the PEM text itself"
                    ) from None
        return cls(config.auth_mode, secret, public_key, now)

    def authenticate(self, headers: Mapping[str, str], query: Mapping[str, list[str]] | str) -> Identity:
        """The identity behind an upgrade or history request.

        `headers`: the request headers (the Authorization lookup is
        case-insensitive). `query`: the parsed query (`parse_qs` shape) or the
        raw query string, with or without its leading `?`.

        In dev mode never raises. In jwt mode raises AuthError, whose message is
        the 401 body, for a missing, malformed, forged, expired or not yet
        valid token, or one with bad claims.
        """
        if isinstance(query, str):
            query = parse_qs(query.removeprefix("?"), keep_blank_values=True) if query else {}
        if self.auth_mode == "dev":
            return Identity(self._dev_user(query), None)
        return self._verify(self._token(headers, query))

    def verify(self, token: str) -> Identity:
        """The identity of a bare token (a `refresh` frame). Raises AuthError as `authenticate` does."""
        if self.auth_mode == "dev":
            raise AuthError("this server does not use tokens (auth_mode dev)")
        return self._verify(token)

    def _dev_user(self, query: Mapping[str, list[str]]) -> str:
        values = query.get("user")
        user = values[0][:MAX_USER_CHARS] if values else ""
        return user or f"anon-{next(self._anon)}"

    @staticmethod
    def _token(headers: Mapping[str, str], query: Mapping[str, list[str]]) -> str:
        value = headers.get("Authorization")
        if value is None:
            value = headers.get("authorization")
        if value is None:
            # A plain dict with some other spelling of the name.
            value = next((v for k, v in headers.items() if k.lower() == "authorization"), None)
        if value is not None:
            parts = value.split(None, 1)
            if not parts or parts[0].lower() != "bearer":
                raise AuthError("authorization header must be: Bearer <token>")
            if len(parts) == 1:
                raise AuthError(_MISSING_TOKEN)
            return parts[1].strip()
        values = query.get("token")
        if not values or not values[0]:
            raise AuthError(_MISSING_TOKEN)
        return values[0]

    def _alg(self, token: str) -> Any:
        segment = token.partition(".")[0]
        cache = self._alg_of_header
        alg = cache.get(segment, _ABSENT)
        if alg is _ABSENT:
            try:
                header = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
            except (ValueError, binascii.Error):
                raise AuthError("token is malformed") from None
            alg = header.get("alg") if isinstance(header, dict) else None
            if len(cache) >= 16:
                cache.clear()
            cache[segment] = alg
        return alg

    def _verify(self, token: str) -> Identity:
        alg = self._alg(token)
        key = self._keys.get(alg) if isinstance(alg, str) else None
        if key is None:
            raise AuthError(self._refused_alg)
        try:
            # `algorithms` is the one whose key we hold: an HS256 token is
            # never checked against the RSA public key (RFC 8725 section 2.1).
            signed = self._jws.decode_complete(token, key, algorithms=[alg])
        except jwt.InvalidSignatureError:
            raise AuthError("token signature is invalid") from None
        except jwt.PyJWTError:
            raise AuthError("token is malformed") from None
        try:
            claims = orjson.loads(signed["payload"])
        except orjson.JSONDecodeError:
            raise AuthError("token payload is not JSON") from None
        if not isinstance(claims, dict):
            raise AuthError("token payload is not a JSON object")
        return self._identity(claims)

    def _identity(self, claims: dict[str, Any]) -> Identity:
        now = self._now()
        exp = claims.get("exp")
        if exp is None:
            raise AuthError("token has no exp claim")
        if not _number(exp):
            raise AuthError("token exp must be a number of seconds since the epoch")
        if exp <= now - self._leeway_s:
            raise AuthError("token expired")
        nbf = claims.get("nbf")
        if nbf is not None and (not _number(nbf) or nbf > now + self._leeway_s):
            raise AuthError("token is not valid yet (nbf)")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthError("token has no sub claim: it must be a non-empty string (the user id)")
        if len(sub) > MAX_USER_CHARS:
            raise AuthError(f"token sub is longer than {MAX_USER_CHARS} characters")
        iat = claims.get("iat")
        if iat is not None and not _number(iat):
            raise AuthError("token iat must be a number of seconds since the epoch")
        rooms = claims.get("rooms", _ABSENT)
        if rooms is _ABSENT:
            return Identity(sub, None, exp, iat)
        if not isinstance(rooms, list) or not all(isinstance(r, str) and r for r in rooms):
            raise AuthError("token rooms must be a list of room ids or patterns")
        return Identity(sub, tuple(rooms), exp, iat)


def mint(
    secret: str,
    sub: str,
    rooms: Sequence[str] | None = None,
    ttl_s: float = 3600,
    now: Callable[[], float] = time.time,
) -> str:
    """An HS256 token for `sub`, valid for `ttl_s` seconds; `rooms` None means every room.

    For `roomcast token`, tests and demos. Raises ValueError for an empty
    secret or sub, or a ttl_s that is not positive. Does not check the secret's
    length (from_config and `roomcast token` do).
    """
    if not secret:
        raise ValueError("secret is empty")
    if not sub:
        raise ValueError("sub is empty")
    if not ttl_s > 0:
        raise ValueError(f"ttl_s is {ttl_s}; it must be positive")
    issued = now()
    claims: dict[str, Any] = {"sub": sub, "iat": int(issued), "exp": int(issued + ttl_s)}
    if rooms is not None:
        claims["rooms"] = list(rooms)
    payload = orjson.dumps(claims)
    return _MINT_JWS.encode(payload, secret.encode(), algorithm="HS256")
