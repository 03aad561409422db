"""Does RL improve the toy editor? Each objective on several seeds at the same budget of edits, then a
paired held-out evaluation (same inputs, same noise; `trainer.evaluate.evaluate_models`).

From `configs/demo.yaml` (the toy editor, the oracle judges), for each objective and seed: train
with `--set train.objective=... run.seed=...` (Ray off, scorers in process: the numbers are those of
the Ray/queue path), then compare the toy editor and the trained model on `--items` held-out edits.
Prints one table: oracle_edit.success difference [95 % bootstrap CI], oracle_structure and
L2-outside-mask differences, success per edit kind (start -> trained), and minutes.

    .venv/bin/python -P bench/learning.py --seeds 0 1 2 --objectives spie_ranking ppo:train.clip_range=0.2
    (-P: bench/queue.py would shadow the stdlib queue)

Extra `--set` items apply to every run (e.g. --set run.num_epochs=4 for a quick look); per-objective
ones go after the objective with a colon: --objectives ppo:train.learning_rate=3e-3.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

from trainer.config import load_config
from trainer.evaluate import evaluate_models
from trainer.loop import train

KINDS = ("recolor", "background", "remove", "brighten")


def kind_of(instruction: str) -> str:
    s = instruction.lower()
    if "background" in s:
        return "background"
    if any(w in s for w in ("remove", "delete", "take away")):
        return "remove"
    if "bright" in s:
        return "brighten"
    return "recolor"


def diff(summary: dict, metric: str) -> str:
    d = summary["differences"].get(metric)
    if d is None:
        return "n/a"
    star = "*" if d["excludes_zero"] else " "
    return f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]{star}"


def per_kind(summary: dict) -> str:
    acc = defaultdict(lambda: [0, 0.0, 0.0])
    for item in summary["items"]:
        a = item["metrics"]["start"].get("oracle_edit.success")
        b = item["metrics"]["trained"].get("oracle_edit.success")
        if a is None or b is None:
            continue
        k = acc[kind_of(item["instruction"])]
        k[0] += 1
        k[1] += a
        k[2] += b
    return " ".join(
        f"{name[:5]} {acc[name][1] / acc[name][0]:.2f}->{acc[name][2] / acc[name][0]:.2f}"
        for name in KINDS
        if acc[name][0]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--objectives", nargs="+", default=["spie_ranking", "ppo:train.clip_range=0.2"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--out", default="runs/learning")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    rows = []
    for spec in args.objectives:
        objective, *extra = spec.split(":")
        for seed in args.seeds:
            name = f"{objective}-s{seed}"
            overrides = [
                "ray.enabled=false",
                "reward.transport=inprocess",
                "eval.after_training=false",
                "run.quiet=true",
                f"run.output_dir={args.out}",
                f"run.name={name}",
                f"run.seed={seed}",
                f"train.objective={objective}",
                *args.set,
                *extra,
            ]
            config = load_config(args.config, overrides)
            t0 = time.perf_counter()
            run_dir = train(config, progress=False)
            t1 = time.perf_counter()
            e = config.eval
            summary = evaluate_models(
                [config.model.pretrained, str(run_dir)],
                config=config,
                out_dir=Path(run_dir),
                num_items=args.items,
                seed=e.seed,
                overrides=e.data_overrides,
                labels=["start", "trained"],
                resamples=e.resamples,
            )
            t2 = time.perf_counter()
            rows.append(
                (
                    spec,
                    seed,
                    diff(summary, "oracle_edit.success"),
                    diff(summary, "oracle_structure"),
                    diff(summary, "l2_outside_mask"),
                    per_kind(summary),
                    f"{(t1 - t0) / 60:.1f}+{(t2 - t1) / 60:.1f}",
                )
            )
            print(f"[learning] {name}: success {rows[-1][2]}", flush=True)
    head = ("objective", "seed", "success diff [95% CI]", "structure diff", "L2 outside diff",
            "success by kind (start->trained)", "min train+eval")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(f"(n = {args.items} held-out items per run; * : the CI excludes 0)")


if __name__ == "__main__":
    main()
