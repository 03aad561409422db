"""`spie queue stats`: what each scorer's queue holds and how fast it drains.

REDIS_URL=redis://127.0.0.1:6379/0 REDIS_PASSWORD=... spie queue stats [--interval 1] [--json]
"""

from __future__ import annotations

import argparse
import json

from reward_servers.errors import UserError


def register(subparsers) -> None:
    queue = subparsers.add_parser("queue", help="inspect the Redis queue fabric")
    commands = queue.add_subparsers(dest="queue_command", metavar="COMMAND")
    commands.required = True
    stats = commands.add_parser("stats", help="stream length, pending, replicas, dead letters, throughput")
    stats.add_argument("--redis-url", help="Redis URL (default: REDIS_URL; password: URL or REDIS_PASSWORD)")
    stats.add_argument(
        "--interval", type=float, default=1.0, help="seconds to measure throughput over (0: skip)"
    )
    stats.add_argument("--json", action="store_true", help="print one JSON object per scorer")
    stats.set_defaults(func=run_stats)


def run_stats(args: argparse.Namespace) -> int:
    import redis

    from reward_servers.queue import protocol as P
    from reward_servers.queue.stats import collect, format_table

    url = P.redis_url(args.redis_url)
    if not url:
        raise UserError("--redis-url: no Redis URL given and REDIS_URL is not set")
    if args.interval < 0:
        raise UserError(f"--interval must be >= 0, got {args.interval}")
    client = P.connect(url, socket_timeout=10.0)
    try:
        rows = collect(client, args.interval)
    except (redis.RedisError, OSError) as err:
        raise UserError(f"--redis-url {P.describe(url)}: {type(err).__name__}: {err}") from None
    finally:
        client.close()
    if args.json:
        for row in rows:
            print(json.dumps(row.as_dict()))
    elif rows:
        print(format_table(rows))
    else:
        print("no scorer queues yet")
    return 0
