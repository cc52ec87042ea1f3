"""`roomcast token`: mint an HS256 token for a user, for tests, demos and scripts.

    roomcast token --sub alice --rooms 'team-*,lobby' --ttl-s 600

prints the token alone on stdout, so `TOKEN=$(roomcast token --sub alice)`
works. The secret is `--secret` or, failing that, ROOMCAST_JWT_SECRET: the
same variable the gateway and the chat service verify with.

Import is cheap (argparse only); PyJWT and cryptography load in `run`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

__all__ = ["add_parser", "run"]

_SECRET_ENV = "ROOMCAST_JWT_SECRET"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `token` subcommand to the `add_subparsers()` object of the roomcast parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "token",
        help="print an HS256 token for a user (for tests and demos)",
        description="Print a signed HS256 JWT for --sub on stdout (PROTOCOL.md section 1).",
    )
    parser.add_argument("--sub", required=True, help="user id: the token's sub claim")
    parser.add_argument(
        "--rooms",
        default=None,
        help="comma-separated room ids or glob patterns the user may join and send to, e.g. 'team-*,lobby' "
        "(default: every room; an empty string: no room)",
    )
    parser.add_argument("--ttl-s", dest="ttl_s", type=float, default=3600.0, help="lifetime [s] (default: 3600)")
    parser.add_argument(
        "--secret", default=None, help=f"HS256 secret, at least 32 bytes (default: ${_SECRET_ENV})"
    )
    return parser


def _error(message: str) -> int:
    print(f"roomcast token: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Print the token; return the exit status (0, or 2 with a message on stderr for a bad flag)."""
    from roomcast.auth import MAX_USER_CHARS, MIN_HS256_SECRET_BYTES, mint

    # The one place outside roomcast.config that reads the environment: a
    # client-side command whose only setting is this secret.
    secret = args.secret if args.secret is not None else os.environ.get(_SECRET_ENV, "")
    if not secret:
        return _error(f"no secret: pass --secret or set {_SECRET_ENV} (the gateway's jwt_secret)")
    if len(secret.encode()) < MIN_HS256_SECRET_BYTES:
        return _error(
            f"the secret is {len(secret.encode())} bytes; HS256 needs at least {MIN_HS256_SECRET_BYTES} "
            "and the gateway refuses a shorter jwt_secret: generate one with "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    if not args.sub or len(args.sub) > MAX_USER_CHARS:
        return _error(f"--sub must be 1 to {MAX_USER_CHARS} characters")
    if not args.ttl_s > 0:
        return _error(f"--ttl-s is {args.ttl_s:g}; it must be positive")
    rooms = None if args.rooms is None else [r.strip() for r in args.rooms.split(",") if r.strip()]
    print(mint(secret, args.sub, rooms, args.ttl_s))
    return 0
