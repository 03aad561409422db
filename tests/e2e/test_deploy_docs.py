"""The shell blocks of deploy/README.md are promises: each runs here as written, or its fence says what
it needs that a test cannot have.

A fence's info string after `bash` says which:
- nothing: the block runs, in order with the others, in one bash session (exports carry over), in a
  copy of the checkout;
- `stand-in=ray-head`: the block runs against a cluster head: `spie cluster up -f
  tests/data/compose-jobs.yml` (Redis and a Ray head with its job API, on loopback) stands in for the
  head the documented setup starts, and its `.spie/ray-head.env` gives the variables that setup exports;
- `needs=docker,gpu,nodes,hub`: not run (a container engine, a GPU, a second node, a model hub); every
  `spie` / `spie-reward` command in it must still parse with the real parsers.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "deploy" / "README.md"
FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```bash(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S
)
NEEDS = {"docker", "gpu", "nodes", "hub"}
STAND_INS = {"ray-head"}


def blocks(text: str) -> list[tuple[dict[str, str], str]]:
    """(info, body) of every bash fence; info maps `needs` / `stand-in` to its value."""
    out = []
    for m in FENCE.finditer(text):
        info = dict(part.split("=", 1) for part in m["info"].split())
        out.append((info, textwrap.dedent(m["body"])))
    return out


def commands(body: str) -> list[list[str]]:
    """The command lines of a block (continuations joined, comments dropped), each as argv; the
    entrypoint of `ray job submit ... -- CMD` counts as a command of its own."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        while argv and "=" in argv[0] and not argv[0].startswith("-"):  # VAR=value prefixes
            argv = argv[1:]
        if not argv:
            continue
        out.append(argv)
        if argv[:3] == ["ray", "job", "submit"] and "--" in argv:
            out.append(argv[argv.index("--") + 1 :])
    return out


def parses(argv: list[str]) -> None:
    """Parse a `spie` / `spie-reward` command with the real parser (SystemExit on a bad command)."""
    from reward_servers.__main__ import build_parser as reward_parser
    from trainer.cli import build_parser

    parser = {"spie": build_parser, "spie-reward": reward_parser}[argv[0]]()
    args = parser.parse_args(argv[1:])
    if argv[:2] == ["spie", "train"] and args.config:  # the preset and every --set load
        from trainer.config import load_config

        load_config(REPO / args.config, [o.replace("$PWD", "/tmp") for o in args.overrides])


def test_every_block_runs_or_says_what_it_needs_and_parses():
    found = blocks(DOC.read_text())
    assert len(found) >= 4
    runnable = 0
    for info, body in found:
        assert set(info) <= {"needs", "stand-in"}, info
        needs = set(info.get("needs", "").split(",")) - {""}
        assert needs <= NEEDS, f"unknown needs {needs - NEEDS}: {body[:80]}"
        assert info.get("stand-in", "ray-head") in STAND_INS
        runnable += not needs
        for argv in commands(body):
            assert argv[:2] != ["spie", "serve"], "the reward server is `spie-reward serve`"
            if argv[0] in ("spie", "spie-reward"):
                parses(argv)
    assert runnable >= 2


def copy_checkout(target: Path) -> None:
    """The checkout as git sees it (tracked and untracked files, nothing ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def _run_blocks(work: Path):
    """Copy the checkout to `work` and run the doc's runnable blocks there as one bash script;
    returns (work, the finished process, the stand-in cluster's log)."""
    copy_checkout(work)
    bin_dir = Path(sys.executable).parent
    script = [
        "set -euo pipefail",
        'cluster=""',
        "trap '[ -n \"$cluster\" ] && kill -INT $cluster; wait' EXIT",
    ]
    for i, (info, body) in enumerate(blocks(DOC.read_text())):
        if info.get("needs"):
            continue
        if info.get("stand-in") == "ray-head" and "cluster=$!" not in "\n".join(script):
            script += [
                "spie cluster up -f tests/data/compose-jobs.yml --project-directory . --wait > cluster.log 2>&1 & cluster=$!",
                "for _ in $(seq 240); do [ -f .spie/ray-head.env ] && break; sleep 0.5; done",
                "source .spie/ray-head.env",
            ]
        (work / f"block-{i}.sh").write_text(body)
        script += [f"echo '### block {i}'", f"source block-{i}.sh"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SPIE_", "REDIS_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="1")
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)], cwd=work, env=env, capture_output=True, text=True, timeout=900
    )
    log = (work / "cluster.log").read_text() if (work / "cluster.log").exists() else ""
    return work, done, log


@pytest.mark.slow
def test_the_runnable_blocks_run_as_written(tmp_path):
    for attempt in range(2):
        work, done, log = _run_blocks(tmp_path / f"checkout-{attempt}")
        # gRPC's C core aborted a trainer once (7 Dec 2026, the first sighting, in 1 of 3 full-suite
        # runs on 2 loaded cores): "ev_epoll1_linux.cc:456] Check failed: wakeup_fd_->Wakeup().ok()",
        # 2 s into `spie train --ray-address ray://...`. Only that abort is tried again (its cause is
        # not found yet; see the closing note of session 9).
        if "wakeup_fd_->Wakeup().ok()" not in done.stdout + done.stderr + log:
            break
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}\n{log[-3000:]}"
    assert "succeeded" in done.stderr + done.stdout
    landed = list((work / "runs").glob("tiny/metrics.jsonl"))
    assert landed, "the job's run folder did not land on the host"
    epoch = json.loads(landed[0].read_text().splitlines()[-1])
    assert epoch["reward/brightness/replicas"] >= 1  # scored by replica actors the job placed
