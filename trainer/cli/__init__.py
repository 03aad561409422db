"""The `spie` command: one console script, one subcommand per job.

Each package adds its own subcommands through a `register(subparsers)` function, so this file only
dispatches. A subcommand sets `func(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from reward_servers.__main__ import run

# Modules exposing `register(subparsers)`, in the order `spie --help` lists them.
_COMMAND_MODULES = (
    "trainer.cli.train",
    "trainer.cli.evaluate",
    "reward_servers.cli",
    "reward_servers.queue.cli",
    "trainer.cli.cluster",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spie", description="Post-train InstructPix2Pix editors with RL from AI feedback."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
