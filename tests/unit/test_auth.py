"""roomcast.auth: tokens at the upgrade (PROTOCOL.md section 1) and room permissions."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from roomcast.auth import DEFAULT_LEEWAY_S, Authenticator, AuthError, Identity, mint
from roomcast.config import ChatConfig, ConfigError, GatewayConfig

SECRET = "s" * 32
OTHER_SECRET = "o" * 32
NOW = 1_800_000_000.0


def clock() -> float:
    return NOW


def jwt_auth(secret: str = SECRET, public_key: str = "") -> Authenticator:
    return Authenticator("jwt", secret, public_key, clock)


_DROP = object()  # claims(exp=_DROP): a token without that claim


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "exp": int(NOW) + 60}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not _DROP}


def hs256(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return ".".join([b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), b64(signature)])


def hand_signed_hs256(payload: dict[str, Any]) -> str:
    # Signed by hand: jwt.encode checks some claims itself, and these tests
    # need tokens that reach our own checks.
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(payload).encode())
    signature = hmac.new(SECRET.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64(signature)}"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


# --- signatures and algorithms -------------------------------------------------


def test_valid_hs256_token_names_the_user() -> None:
    identity = jwt_auth().authenticate(bearer(hs256(claims())), {})
    assert identity == Identity("alice", None)


def test_forged_signature_is_refused() -> None:
    header, _, signature = hs256(claims()).split(".")
    forged_payload = b64(json.dumps(claims(sub="mallory")).encode())
    with pytest.raises(AuthError, match="signature is invalid"):
        jwt_auth().authenticate(bearer(f"{header}.{forged_payload}.{signature}"), {})


def test_token_signed_with_another_secret_is_refused() -> None:
    with pytest.raises(AuthError, match="signature is invalid"):
        jwt_auth().authenticate(bearer(hs256(claims(), OTHER_SECRET)), {})


def test_alg_none_token_is_refused() -> None:
    token = unsigned_token({"alg": "none", "typ": "JWT"}, claims())
    with pytest.raises(AuthError, match="algorithm is not accepted"):
        jwt_auth().authenticate(bearer(token), {})


def test_algorithm_not_configured_is_refused_even_if_pyjwt_knows_it() -> None:
    token = jwt.encode(claims(), "k" * 64, algorithm="HS512")
    with pytest.raises(AuthError, match="algorithm is not accepted; use HS256$"):
        jwt_auth().authenticate(bearer(token), {})


def test_rs256_token_is_accepted_with_the_public_key(rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(sub="bob"), rsa_key, algorithm="RS256")
    identity = jwt_auth(public_key=public_pem(rsa_key)).authenticate(bearer(token), {})
    assert identity.user == "bob"


def test_rs256_token_is_accepted_with_only_a_public_key(rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(sub="bob"), rsa_key, algorithm="RS256")
    auth = Authenticator("jwt", "", public_pem(rsa_key), clock)
    assert auth.authenticate(bearer(token), {}).user == "bob"
    with pytest.raises(AuthError, match="algorithm is not accepted"):
        auth.authenticate(bearer(hs256(claims())), {})


def test_rs256_token_is_refused_without_a_public_key(rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    with pytest.raises(AuthError, match="algorithm is not accepted"):
        jwt_auth().authenticate(bearer(token), {})


def test_rs256_token_signed_by_another_key_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(), stranger, algorithm="RS256")
    with pytest.raises(AuthError, match="signature is invalid"):
        jwt_auth(public_key=public_pem(rsa_key)).authenticate(bearer(token), {})


def test_hs256_token_keyed_with_the_public_key_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    # Algorithm confusion (RFC 8725 section 2.1): the public key is public, so
    # an HS256 token "signed" with it must not verify.
    pem = public_pem(rsa_key)
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps(claims(sub="mallory")).encode())
    signature = hmac.new(pem.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    with pytest.raises(AuthError, match="signature is invalid"):
        jwt_auth(public_key=pem).authenticate(bearer(f"{header}.{payload}.{b64(signature)}"), {})


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "!!!.e30.sig", ""])
def test_malformed_token_is_refused_with_a_short_message(token: str) -> None:
    with pytest.raises(AuthError) as caught:
        jwt_auth().authenticate({}, {"token": [token]} if token else {})
    assert len(str(caught.value)) < 80


def test_payload_that_is_not_an_object_is_refused() -> None:
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(b"[1, 2]")
    signature = hmac.new(SECRET.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    with pytest.raises(AuthError, match="not a JSON object"):
        jwt_auth().authenticate(bearer(f"{header}.{payload}.{b64(signature)}"), {})


# --- claims -------------------------------------------------------------------


def test_expired_token_is_refused_by_the_injected_clock() -> None:
    token = hs256(claims(exp=int(NOW - DEFAULT_LEEWAY_S) - 1))
    with pytest.raises(AuthError, match="^token expired$"):
        jwt_auth().authenticate(bearer(token), {})


def test_token_expired_within_the_leeway_is_accepted() -> None:
    token = hs256(claims(exp=int(NOW) - 1))
    assert jwt_auth().authenticate(bearer(token), {}).user == "alice"


def test_token_is_accepted_until_it_expires_and_refused_after() -> None:
    token = hs256(claims(exp=int(NOW) + 10))
    times = iter([NOW, NOW + 10 + DEFAULT_LEEWAY_S - 1, NOW + 10 + DEFAULT_LEEWAY_S])
    auth = Authenticator("jwt", SECRET, "", lambda: next(times))
    assert auth.authenticate(bearer(token), {}).user == "alice"
    assert auth.authenticate(bearer(token), {}).user == "alice"
    with pytest.raises(AuthError, match="expired"):
        auth.authenticate(bearer(token), {})


def test_token_not_valid_before_its_nbf_is_refused() -> None:
    token = hs256(claims(nbf=int(NOW) + 60))
    with pytest.raises(AuthError, match="not valid yet"):
        jwt_auth().authenticate(bearer(token), {})


def test_token_without_exp_is_refused() -> None:
    with pytest.raises(AuthError, match="no exp"):
        jwt_auth().authenticate(bearer(hs256(claims(exp=_DROP))), {})


@pytest.mark.parametrize("exp", ["soon", True, [1]])
def test_token_with_a_non_numeric_exp_is_refused(exp: Any) -> None:
    with pytest.raises(AuthError, match="exp"):
        jwt_auth().authenticate(bearer(hand_signed_hs256(claims(exp=exp))), {})


def test_token_without_sub_is_refused() -> None:
    with pytest.raises(AuthError, match="no sub"):
        jwt_auth().authenticate(bearer(hs256(claims(sub=_DROP))), {})


@pytest.mark.parametrize("sub", ["", 42, None])
def test_token_with_an_empty_or_non_string_sub_is_refused(sub: Any) -> None:
    with pytest.raises(AuthError, match="sub"):
        jwt_auth().authenticate(bearer(hand_signed_hs256(claims(sub=sub))), {})


def test_token_with_a_sub_over_128_characters_is_refused() -> None:
    with pytest.raises(AuthError, match="longer than 128"):
        jwt_auth().authenticate(bearer(hs256(claims(sub="u" * 129))), {})


@pytest.mark.parametrize("rooms", ["team-*", None, [1], ["ok", ""], {"team-a": True}])
def test_token_whose_rooms_is_not_a_list_of_strings_is_refused(rooms: Any) -> None:
    with pytest.raises(AuthError, match="rooms must be a list"):
        jwt_auth().authenticate(bearer(hs256(claims(rooms=rooms))), {})


def test_token_rooms_become_the_identity_rooms() -> None:
    identity = jwt_auth().authenticate(bearer(hs256(claims(rooms=["team-*", "lobby"]))), {})
    assert identity.rooms == ("team-*", "lobby")
    assert identity.may_use("team-a") and identity.may_use("lobby") and not identity.may_use("other")


# --- where the token comes from -----------------------------------------------


def test_token_in_the_query_is_used_without_a_header() -> None:
    assert jwt_auth().authenticate({}, {"token": [hs256(claims())]}).user == "alice"


def test_token_in_a_raw_query_string_is_used() -> None:
    token = hs256(claims())
    assert jwt_auth().authenticate({}, f"?room=x&token={token}").user == "alice"
    assert jwt_auth().authenticate({}, f"token={token}").user == "alice"


def test_header_token_wins_over_query_token() -> None:
    header_token = hs256(claims(sub="from-header"))
    query_token = hs256(claims(sub="from-query"))
    identity = jwt_auth().authenticate(bearer(header_token), {"token": [query_token]})
    assert identity.user == "from-header"


def test_bad_header_token_is_refused_even_with_a_good_query_token() -> None:
    with pytest.raises(AuthError, match="signature is invalid"):
        jwt_auth().authenticate(bearer(hs256(claims(), OTHER_SECRET)), {"token": [hs256(claims())]})


@pytest.mark.parametrize("name", ["authorization", "AUTHORIZATION", "Authorization"])
def test_authorization_header_name_is_case_insensitive(name: str) -> None:
    headers = {"Host": "x", name: f"bearer  {hs256(claims())}"}
    assert jwt_auth().authenticate(headers, {}).user == "alice"


def test_missing_token_is_refused_with_how_to_send_one() -> None:
    with pytest.raises(AuthError, match=r"^missing token: send Authorization: Bearer <token> or \?token=$"):
        jwt_auth().authenticate({}, {})


def test_authorization_header_with_another_scheme_is_refused() -> None:
    with pytest.raises(AuthError, match="Bearer"):
        jwt_auth().authenticate({"Authorization": "Basic YWxpY2U6cHc="}, {})


# --- rooms --------------------------------------------------------------------


def test_glob_team_star_allows_team_rooms_only() -> None:
    identity = Identity("u", ("team-*",))
    assert identity.may_use("team-a")
    assert identity.may_use("team-")
    assert not identity.may_use("teams")
    assert not identity.may_use("other")
    assert not identity.may_use("my-team-a")


def test_exact_room_ids_allow_only_themselves() -> None:
    identity = Identity("u", ("lobby", "r1"))
    assert identity.may_use("lobby") and identity.may_use("r1")
    assert not identity.may_use("lobby2") and not identity.may_use("r")


def test_absent_rooms_allow_every_room() -> None:
    identity = Identity("u", None)
    assert identity.may_use("anything") and identity.may_use("team-a")


def test_empty_rooms_allow_no_room() -> None:
    identity = Identity("u", ())
    assert not identity.may_use("lobby") and not identity.may_use("team-a")


def test_glob_follows_fnmatchcase_for_question_mark_brackets_and_case() -> None:
    identity = Identity("u", ("r?", "zone-[ab]", "x[!0-9]"))
    assert identity.may_use("r1") and not identity.may_use("r12")
    assert identity.may_use("zone-a") and not identity.may_use("zone-c")
    assert identity.may_use("xq") and not identity.may_use("x5")
    assert not Identity("u", ("team-*",)).may_use("TEAM-a")


def test_may_use_answers_the_same_from_its_cache() -> None:
    identity = Identity("u", ("team-*",))
    first = [identity.may_use(r) for r in ("team-a", "teams", "team-a", "teams")]
    assert first == [True, False, True, False]


def test_may_use_cache_stays_bounded() -> None:
    identity = Identity("u", ("team-*",))
    for i in range(2000):
        assert identity.may_use(f"team-{i}")
        assert not identity.may_use(f"room-{i}")
    assert len(identity._cache) <= 256


def test_identity_built_from_a_list_holds_a_tuple_and_compares_by_value() -> None:
    identity = Identity("u", ["lobby"])  # type: ignore[arg-type]
    assert identity.rooms == ("lobby",)
    assert identity == Identity("u", ("lobby",)) and hash(identity) == hash(Identity("u", ("lobby",)))


# --- dev mode -----------------------------------------------------------------


def test_dev_mode_user_query_names_the_user() -> None:
    identity = Authenticator("dev").authenticate({}, {"user": ["carol"]})
    assert identity == Identity("carol", None)
    assert Authenticator("dev").authenticate({}, "?user=dave").user == "dave"


def test_dev_mode_gives_unique_anon_names_without_user() -> None:
    auth = Authenticator("dev")
    names = [auth.authenticate({}, {}).user for _ in range(100)] + [auth.authenticate({}, {"user": [""]}).user]
    assert len(set(names)) == len(names)
    assert all(name.startswith("anon-") and name[5:].isdigit() for name in names)


def test_dev_mode_cuts_user_to_128_characters() -> None:
    assert Authenticator("dev").authenticate({}, {"user": ["u" * 500]}).user == "u" * 128


def test_dev_mode_ignores_tokens_and_never_raises() -> None:
    identity = Authenticator("dev", SECRET).authenticate({"Authorization": "garbage"}, "token=bad&user=erin")
    assert identity == Identity("erin", None)


# --- configuration ------------------------------------------------------------


def test_unknown_auth_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="auth_mode"):
        Authenticator("oauth")


def test_jwt_mode_without_any_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="ROOMCAST_JWT_SECRET"):
        Authenticator("jwt", "", "")


def test_from_config_reads_a_public_key_from_an_at_path(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    key_file = tmp_path / "jwt.pub"
    key_file.write_text(public_pem(rsa_key))
    config = GatewayConfig(auth_mode="jwt", jwt_public_key=f"@{key_file}")
    auth = Authenticator.from_config(config, clock)
    token = jwt.encode(claims(sub="bob"), rsa_key, algorithm="RS256")
    assert auth.authenticate(bearer(token), {}).user == "bob"


def test_from_config_refuses_an_unreadable_key_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    config = ChatConfig(auth_mode="jwt", jwt_secret=SECRET, jwt_public_key=f"@{missing}")
    with pytest.raises(ConfigError, match=r"jwt_public_key.*ROOMCAST_JWT_PUBLIC_KEY.*nope\.pem.*fix the path"):
        Authenticator.from_config(config)


def test_from_config_refuses_a_malformed_public_key(tmp_path: Path) -> None:
    key_file = tmp_path / "bad.pem"
    key_file.write_text("-----BEGIN PUBLIC KEY-----\nnot base64 at all\n-----END PUBLIC KEY-----\n")
    config = GatewayConfig(auth_mode="jwt", jwt_public_key=f"@{key_file}")
    with pytest.raises(ConfigError, match="jwt_public_key.*not a PEM public key"):
        Authenticator.from_config(config)


def test_from_config_refuses_a_private_key_as_the_public_key(rsa_key: rsa.RSAPrivateKey) -> None:
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    with pytest.raises(ConfigError, match="private key"):
        Authenticator.from_config(GatewayConfig(auth_mode="jwt", jwt_public_key=pem))


def test_from_config_refuses_an_rsa_key_under_2048_bits() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ConfigError, match="1024-bit"):
        Authenticator.from_config(GatewayConfig(auth_mode="jwt", jwt_public_key=public_pem(small)))


def test_from_config_accepts_a_pem_with_escaped_newlines(rsa_key: rsa.RSAPrivateKey) -> None:
    one_line = public_pem(rsa_key).replace("\n", "\\n")
    auth = Authenticator.from_config(GatewayConfig(auth_mode="jwt", jwt_public_key=one_line), clock)
    assert auth.algorithms == ("RS256",)


def test_from_config_refuses_an_hs256_secret_under_32_bytes() -> None:
    with pytest.raises(ConfigError, match=r"jwt_secret.*ROOMCAST_JWT_SECRET.*31 bytes.*at least 32"):
        Authenticator.from_config(GatewayConfig(auth_mode="jwt", jwt_secret="s" * 31))


def test_from_config_in_dev_mode_ignores_keys() -> None:
    config = GatewayConfig(auth_mode="dev", jwt_secret="short", jwt_public_key="@/nonexistent")
    assert Authenticator.from_config(config).authenticate({}, {"user": ["x"]}).user == "x"


def test_pem_key_as_hs256_secret_is_a_config_error(rsa_key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(ConfigError, match="jwt_secret.*PEM"):
        Authenticator("jwt", public_pem(rsa_key), "")


# --- mint ---------------------------------------------------------------------


def test_minted_token_verifies_with_its_rooms_and_ttl() -> None:
    token = mint(SECRET, "alice", ["team-*"], ttl_s=30, now=clock)
    identity = jwt_auth().authenticate(bearer(token), {})
    assert identity == Identity("alice", ("team-*",))
    unverified = jwt.decode(token, options={"verify_signature": False})
    assert unverified["exp"] == int(NOW) + 30


def test_minted_token_without_rooms_allows_every_room() -> None:
    identity = jwt_auth().authenticate(bearer(mint(SECRET, "alice", now=clock)), {})
    assert identity.rooms is None


def test_minted_token_is_refused_after_its_ttl() -> None:
    token = mint(SECRET, "alice", ttl_s=30, now=clock)
    later = Authenticator("jwt", SECRET, "", lambda: NOW + 30 + DEFAULT_LEEWAY_S)
    with pytest.raises(AuthError, match="expired"):
        later.authenticate(bearer(token), {})


@pytest.mark.parametrize(("secret", "sub", "ttl_s"), [("", "a", 60), (SECRET, "", 60), (SECRET, "a", 0)])
def test_mint_refuses_empty_secret_empty_sub_and_non_positive_ttl(secret: str, sub: str, ttl_s: float) -> None:
    with pytest.raises(ValueError):
        mint(secret, sub, ttl_s=ttl_s)
