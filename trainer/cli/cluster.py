"""`spie cluster up`: run docker-compose.yml's services as local processes (see `launcher`).

spie cluster up                                   # every service of ./docker-compose.yml
spie cluster up --services redis,depth --scale depth=2
spie cluster up -f docker-compose.yml -f override.yml --exit-code-from trainer
spie cluster up --dry-run                         # print what would run
spie cluster up --profile viescore --profile grounding   # add optional model-backed scorers
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from trainer.errors import UserError


def register(subparsers) -> None:
    cluster = subparsers.add_parser("cluster", help="run the compose services as local processes")
    sub = cluster.add_subparsers(dest="cluster_command", metavar="ACTION")
    sub.required = True
    up = sub.add_parser("up", help="start the services of a compose file here, without containers")
    up.add_argument(
        "-f",
        "--file",
        dest="files",
        action="append",
        type=Path,
        help="compose file (repeat to merge overrides; default docker-compose.yml)",
    )
    up.add_argument(
        "--project-directory",
        type=Path,
        help="where the processes run and relative paths point (default: the first file's folder)",
    )
    up.add_argument(
        "--services", default="", help="comma-separated services to start (and their dependencies)"
    )
    up.add_argument(
        "--profile",
        dest="profiles",
        action="append",
        default=[],
        help="enable the services of a compose profile (repeatable; COMPOSE_PROFILES also counts)",
    )
    up.add_argument(
        "--scale", action="append", default=[], metavar="SERVICE=N", help="replicas of a service (repeatable)"
    )
    up.add_argument(
        "--env-file",
        action="append",
        type=Path,
        help="variables for interpolation (repeatable; default: the project's .env if there is one)",
    )
    up.add_argument(
        "--exit-code-from", metavar="SERVICE", help="stop everything when SERVICE exits; exit with its code"
    )
    up.add_argument(
        "--abort-on-container-exit", action="store_true", help="stop everything when any process exits"
    )
    up.add_argument("--timeout", type=float, help="stop everything after this many seconds")
    up.add_argument(
        "--wait", action="store_true", help="wait until every service with a health probe is healthy"
    )
    up.add_argument(
        "--health-timeout",
        type=float,
        help="longest wait for a dependency to be healthy (default: its healthcheck)",
    )
    up.add_argument(
        "--dry-run", action="store_true", help="print each process's command and environment, start nothing"
    )
    up.set_defaults(func=cmd_up)


def parse_scale(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, sep, count = item.partition("=")
        if not sep or not count.isdigit():
            raise UserError(f"--scale {item!r}: expected SERVICE=N, e.g. depth=3")
        out[name] = int(count)
    return out


def cmd_up(args: argparse.Namespace) -> int:
    from trainer.cluster.compose import load_project
    from trainer.cluster.launcher import Launcher

    files = args.files or [Path("docker-compose.yml")]
    names = [n.strip() for n in args.services.split(",") if n.strip()]
    project = load_project(
        files, args.env_file, dict(os.environ), args.project_directory, args.profiles, names
    )
    launcher = Launcher(project, names, parse_scale(args.scale), dict(os.environ), args.health_timeout)
    if args.dry_run:
        for line in launcher.describe():
            print(line)
        return 0
    return launcher.up(args.exit_code_from, args.abort_on_container_exit, args.timeout, args.wait)
