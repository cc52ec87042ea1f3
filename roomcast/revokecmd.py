"""`roomcast revoke USER`: cut a user off now, on every gateway.

    roomcast revoke alice            # close alice's sockets (4002), refuse her current tokens
    roomcast revoke --lift alice     # forget the revocation
    roomcast revoke --list           # who is revoked, since when

It writes the revocation to Redis (the hash every gateway reads at start and
after a reconnect) and publishes it on the control channel (every running
gateway closes the user's sockets within milliseconds). Tokens issued after
the revocation work: let the user back in by issuing a new token. Redis is
found as the gateway finds it: `--redis-url`/`--redis-mode` or
ROOMCAST_REDIS_URL/ROOMCAST_REDIS_MODE.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "revoke",
        help="close every socket of a user on every gateway (4002) and refuse their current tokens",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("user", nargs="?", help="the user id (a token's sub)")
    parser.add_argument("--lift", action="store_true", help="forget USER's revocation instead")
    parser.add_argument("--list", action="store_true", help="print the revoked users and when")
    parser.add_argument("--redis-url", default=None, help="Redis of the gateways (default: $ROOMCAST_REDIS_URL)")
    parser.add_argument("--redis-mode", default=None, help="single or cluster (default: $ROOMCAST_REDIS_MODE)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Carry out the command; 0, or 2 with a message on stderr (bad flags, Redis unreachable)."""
    from roomcast.config import GatewayConfig, load

    if not args.list and not args.user:
        print("roomcast revoke: name a USER (or pass --list)", file=sys.stderr)
        return 2
    config = load(GatewayConfig, {"redis_url": args.redis_url, "redis_mode": args.redis_mode})
    try:
        return asyncio.run(_run(args, config.redis_url, config.redis_mode == "cluster"))
    except OSError as exc:
        print(f"roomcast revoke: cannot reach Redis at {config.redis_url} ({exc})", file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace, redis_url: str, cluster: bool) -> int:
    import redis.asyncio as aioredis
    from redis.exceptions import ConnectionError as RedisConnectionError

    from roomcast.wire.control import CONTROL_CHANNEL, REVOKED_HASH, Lift, Revoke, encode_control

    client: Any = (aioredis.RedisCluster if cluster else aioredis.Redis).from_url(redis_url, socket_connect_timeout=3)
    try:
        if args.list:
            for user, at in sorted((await client.hgetall(REVOKED_HASH)).items()):
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(at)))
                print(f"{user.decode()}\t{stamp}")
            return 0
        publish = client.spublish if cluster else client.publish
        if args.lift:
            await client.hdel(REVOKED_HASH, args.user)
            await publish(CONTROL_CHANNEL, encode_control(Lift(args.user)))
            print(f"revocation of {args.user} lifted")
            return 0
        at = time.time()
        # The hash first: a gateway that (re)connects after this reads it.
        await client.hset(REVOKED_HASH, args.user, repr(at))
        listeners = await publish(CONTROL_CHANNEL, encode_control(Revoke(args.user, at)))
        print(f"{args.user} revoked; {listeners} gateway worker(s) told")
        return 0
    except RedisConnectionError as exc:
        raise OSError(str(exc)) from exc
    finally:
        await client.aclose()
