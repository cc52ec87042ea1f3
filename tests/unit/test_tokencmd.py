"""roomcast.tokencmd: `roomcast token` prints a token the gateway accepts."""

from __future__ import annotations

import argparse

import pytest

from roomcast import tokencmd
from roomcast.auth import Authenticator, Identity

SECRET = "s" * 32


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="roomcast")
    tokencmd.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["token", *argv])


def printed_identity(capsys: pytest.CaptureFixture[str]) -> Identity:
    out = capsys.readouterr().out
    assert out.count("\n") == 1, "the token alone on one line"
    return Authenticator("jwt", SECRET).authenticate({"Authorization": f"Bearer {out.strip()}"}, {})


def test_token_command_prints_a_token_for_sub_and_rooms(capsys: pytest.CaptureFixture[str]) -> None:
    assert tokencmd.run(parse("--sub", "alice", "--rooms", "team-*, lobby", "--secret", SECRET)) == 0
    assert printed_identity(capsys) == Identity("alice", ("team-*", "lobby"))


def test_token_command_without_rooms_allows_every_room(capsys: pytest.CaptureFixture[str]) -> None:
    assert tokencmd.run(parse("--sub", "alice", "--secret", SECRET)) == 0
    assert printed_identity(capsys).rooms is None


def test_token_command_takes_the_secret_from_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROOMCAST_JWT_SECRET", SECRET)
    assert tokencmd.run(parse("--sub", "bob")) == 0
    assert printed_identity(capsys).user == "bob"


def test_token_command_without_a_secret_names_the_setting(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ROOMCAST_JWT_SECRET", raising=False)
    assert tokencmd.run(parse("--sub", "bob")) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "--secret" in captured.err and "ROOMCAST_JWT_SECRET" in captured.err


def test_token_command_refuses_a_secret_the_gateway_would_refuse(capsys: pytest.CaptureFixture[str]) -> None:
    assert tokencmd.run(parse("--sub", "bob", "--secret", "short")) == 2
    assert "at least 32" in capsys.readouterr().err


def test_token_command_refuses_a_non_positive_ttl(capsys: pytest.CaptureFixture[str]) -> None:
    assert tokencmd.run(parse("--sub", "bob", "--secret", SECRET, "--ttl-s", "0")) == 2
    assert "--ttl-s" in capsys.readouterr().err


def test_token_command_requires_sub() -> None:
    with pytest.raises(SystemExit):
        parse("--secret", SECRET)
