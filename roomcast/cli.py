"""The `roomcast` command: dev, gateway, chat, token, revoke.

Flags are generated from the config sections (roomcast/config.py), so a
setting has one name everywhere: `--max-body-bytes` on the command line,
`ROOMCAST_MAX_BODY_BYTES` in the environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from roomcast import revokecmd, tokencmd
from roomcast.config import ChatConfig, ConfigError, DevConfig, GatewayConfig, load

__all__ = ["main"]


def _add_section_flags(parser: argparse.ArgumentParser, section: type) -> None:
    for f in dataclasses.fields(section):
        flag = "--" + f.name.replace("_", "-")
        unit = f" [{f.metadata['unit']}]" if f.metadata["unit"] else ""
        help_text = f"{f.metadata['doc']}{unit} (default: {f.default!r})"
        if f.type in (bool, "bool"):
            parser.add_argument(flag, dest=f.name, nargs="?", const="true", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_text)


def _flags(args: argparse.Namespace, section: type) -> dict[str, Any]:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(section)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="roomcast", description="real-time chat fan-out")
    sub = parser.add_subparsers(dest="command", required=True)
    dev = sub.add_parser("dev", help="run the whole stack embedded on loopback (Redis, Kafka, chat, gateways)")
    _add_section_flags(dev, DevConfig)
    gw = sub.add_parser("gateway", help="run the WebSocket gateway against given Redis and Kafka")
    _add_section_flags(gw, GatewayConfig)
    gw.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    chat = sub.add_parser("chat", help="run the chat service against given Kafka and database")
    _add_section_flags(chat, ChatConfig)
    tokencmd.add_parser(sub)
    revokecmd.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from roomcast.logs import setup_logging

    try:
        if args.command == "token":
            return tokencmd.run(args)
        if args.command == "revoke":
            return revokecmd.run(args)
        if args.command == "dev":
            from roomcast.dev import run_dev

            config = load(DevConfig, _flags(args, DevConfig))
            setup_logging(config.log_level)
            return run_dev(config)
        if args.command == "gateway":
            from gateway.supervisor import serve

            gw_config = load(GatewayConfig, _flags(args, GatewayConfig))
            setup_logging(gw_config.log_level, gw_config.log_format == "json")
            serve(gw_config, args.worker_index)
            return 0
        if args.command == "chat":
            from chat.app import main as chat_main

            chat_config = load(ChatConfig, _flags(args, ChatConfig))
            setup_logging(chat_config.log_level, chat_config.log_format == "json")
            chat_main(chat_config)
            return 0
    except ConfigError as exc:
        print(f"roomcast: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
