"""Do the reward-hacking guards fire when they should, and only then? (issue 25)

A hackable reward: brightness alone (`oracle_structure` kept at weight 0, so nothing asks the edit
to stay an edit) on the toy editor with the demo's AlignProp recipe. The policy learns to brighten
every image whatever the instruction; the guards (`guard` section, checked on the held-out probe
against the starting policy's edits of the same inputs and noise) should stop it. The demo itself
(`configs/demo.yaml`, the oracles' reward) should trip none: give its run folders with `--demo-runs`
(made by `make demo` or `spie train --config configs/demo.yaml --set run.seed=S`), their
metrics.jsonl is read for `guard.*.change` and any alarm.

    python bench/guards.py --seeds 0 1 2                     # the hack, ~2 min per seed on 2 cores
    python bench/guards.py --demo-runs runs/demo-s0 runs/demo-s1 runs/demo-s2 --seeds

Prints one line per run: the epoch the guard stopped it and the statistics past their thresholds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from pathlib import Path

# The repository root, not bench/ (whose queue.py would shadow the standard library).
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.paired import load_line  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.guard.check import STATS  # noqa: E402
from trainer.loop import train  # noqa: E402

HACK = [
    'reward.scorers=[{"name": "brightness", "role": "semantic"}, '
    '{"name": "oracle_structure", "role": "structural", "weight": 0}]',
    "reward.transport=inprocess",
    "eval.after_training=false",
    "eval.probe_every=2",
    "guard.action=stop",
    "run.image_log_freq=0",
    "run.log_with=[]",
    "run.quiet=true",
]


def hack(seed: int, epochs: int, out: Path) -> dict:
    """One hackable run; returns where it stopped and what tripped."""
    config = load_config(
        "configs/demo.yaml",
        [
            *HACK,
            f"run.seed={seed}",
            f"run.num_epochs={epochs}",
            f"run.output_dir={out}",
            f"run.name=hack-s{seed}",
        ],
    )
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        run_dir = train(config)
    alarms = [line for line in buffer.getvalue().splitlines() if line.startswith("[spie] guard:")]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"seed": seed, "epochs_run": len(records), "alarms": alarms, "last": records[-1]}


def changes(record: dict) -> str:
    return ", ".join(
        f"{k} {record[f'guard.{k}.change']:+.3f}" for k in STATS if f"guard.{k}.change" in record
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20, help="most epochs of a hack run")
    p.add_argument("--out", default="runs/bench-guards")
    p.add_argument("--demo-runs", nargs="*", default=[], help="demo run folders to check for alarms")
    p.add_argument("--smoke", action="store_true", help="seed 0, 2 epochs: runs, need not trip")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.epochs = [0], 2
        args.out = os.environ.get("SPIE_BENCH_OUT", args.out)
    print(load_line())
    ok = True
    for seed in args.seeds:
        r = hack(seed, args.epochs, Path(args.out))
        tripped = bool(r["alarms"])
        ok &= tripped
        print(f"hack seed {seed}: {'STOPPED' if tripped else 'NOT TRIPPED'} after {r['epochs_run']} epochs")
        print(
            f"  probe brightness.mean {r['last'].get('probe.brightness.mean', float('nan')):.3f}; {changes(r['last'])}"
        )
        for line in r["alarms"]:
            print("  " + line)
    for folder in args.demo_runs:
        records = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
        probed = [r for r in records if any(k.startswith("guard.") for k in r)]
        config = load_config(str(Path(folder) / "config.yaml"))
        from trainer.guard.check import Guards

        guards = Guards(config, Path(folder))
        alarms = [line for r in probed for line in guards.check(r)[0]]
        ok &= not alarms
        print(
            f"demo {folder}: {len(alarms)} alarms over {len(probed)} probes; last: {changes(probed[-1]) if probed else '-'}"
        )
        for line in alarms:
            print("  " + line)
    print(
        "guards: " + ("hold" if ok else "DO NOT HOLD") + (" (smoke: too short to trip)" if args.smoke else "")
    )
    print(load_line())
    return 0 if ok or args.smoke else 1


if __name__ == "__main__":
    raise SystemExit(main())
