"""`python -m reward_servers` (or the `spie-reward` script): the reward-server side of the `spie`
command, `serve`, `score` and `queue`, runnable where only `reward_servers` and `protos` are installed
(the reward-server image)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys

from reward_servers import cli
from reward_servers.errors import UserError
from reward_servers.queue import cli as queue_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spie-reward", description="Serve and inspect spie's reward scorers."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cli.register(subparsers)
    queue_cli.register(subparsers)
    return parser


class _Terminated(BaseException):
    """SIGTERM raised in the main thread, so that every `finally` runs: the reward-server children
    and the embedded Redis a run started are stopped, not orphaned (the default action of SIGTERM
    ends the process without running them)."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated


def run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse `argv` and run the subcommand: a `UserError` is one line on stderr and exit status 2,
    Ctrl-C status 130, SIGTERM 143 after cleaning up; anything else is a bug and keeps its traceback.
    (The `spie` command too.) A subcommand may install its own SIGTERM handler (`serve` drains)."""
    args = parser.parse_args(argv)
    previous = None
    with contextlib.suppress(ValueError):  # only the main thread may set a handler
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"{parser.prog} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog} {args.command}: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print(f"{parser.prog} {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
