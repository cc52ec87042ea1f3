"""roomcast.cli: one flag per setting, a bad setting is a message and exit 2, never a traceback."""

from __future__ import annotations

import dataclasses

import pytest

from roomcast.cli import build_parser, main
from roomcast.config import ChatConfig, DevConfig, GatewayConfig


@pytest.mark.parametrize(("command", "section"), [("gateway", GatewayConfig), ("chat", ChatConfig), ("dev", DevConfig)])
def test_every_setting_is_a_flag_of_its_command(command: str, section: type) -> None:
    parser = build_parser()
    for f in dataclasses.fields(section):
        value = "true" if f.type in (bool, "bool") else "1"
        args = parser.parse_args([command, f"--{f.name.replace('_', '-')}", value])
        assert getattr(args, f.name) == value, f.name


def test_a_bad_setting_exits_2_naming_the_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gateway", "--port", "70000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("roomcast: configuration error: setting `port` (ROOMCAST_PORT) is 70000") and "Traceback" not in err


def test_an_unknown_environment_variable_exits_2_with_a_suggestion(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ROOMCAST_MAX_BODY_BYTE", "10")
    assert main(["gateway"]) == 2
    assert "did you mean ROOMCAST_MAX_BODY_BYTES?" in capsys.readouterr().err


def test_revoke_needs_a_user(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["revoke"]) == 2
    assert "name a USER" in capsys.readouterr().err


def test_revoke_against_an_unreachable_redis_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["revoke", "alice", "--redis-url", "redis://127.0.0.1:1"]) == 2
    assert "cannot reach Redis at redis://127.0.0.1:1" in capsys.readouterr().err
