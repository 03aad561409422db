"""Sampling/scoring overlap (`sample.pipeline`) and rollout scaling over Ray workers.

`python bench/overlap.py` runs the real training loop (`trainer.loop.train`) on the tiny model with
several sampling batches ("shards") per epoch, scored through the Redis queue (an embedded Redis and
one `spie serve sleep` replica, as `spie train` starts them) by the latency-bound `sleep` scorer: a
fixed time per batch, almost no CPU, like a GPU model on its own node.

1. Calibration: a sync run with a 0 s sleep measures the rollout time per shard and the queue's own
   time per shard; the sleep is set so that scoring takes about as long as sampling.
2. Overlap: `--rounds` rounds of a sync run and an async run with that sleep, in this process, the
   order alternating between rounds (sync first, then async first, ...). What is timed is the sampling + scoring part of each epoch (`time_sample_score_s` in
   metrics.jsonl: from the first rollout to the last score), not the update, whose time does not
   depend on the pipeline (it is kept trivial: one trained timestep per trajectory). Rollout and
   scoring times are the same round's sync run's (each phase alone; the sync epoch is their sum by
   construction, so no ratio of those is reported). Target: async <= 1.15 x max(rollout, scoring),
   the median of the rounds' paired ratios. Epoch 0 (warm-up) is left out of each run; a run's
   figures are medians of its other epochs (default 4 epochs: 3 timed).
3. Rollout scaling: sampling time per epoch with 1 and 2 Ray rollout workers (sync, in-process
   brightness scorer). Reported, not a target (this machine has 2 cores).
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds queue.py: take the folder off sys.path so `import queue` finds the standard library.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

from bench.paired import load_line, spread  # noqa: E402

os.chdir(ROOT)  # configs/ and the tiny model cache are relative to the checkout


def run(args, out: Path, name: str, *overrides: str) -> list[dict]:
    """Train `args.epochs` epochs of the tiny preset with `overrides`; metrics of epochs 1.. (0 is warm-up)."""
    from trainer.config import load_config
    from trainer.loop import train
    from trainer.run.log import read_metrics

    config = load_config(
        "configs/tiny.yaml",
        [
            f"run.name={name}",
            f"run.output_dir={out}",
            f"run.num_epochs={args.epochs}",
            "run.quiet=true",
            "run.image_log_freq=0",
            f"run.save_freq={args.epochs}",
            f"sample.num_steps={args.steps}",
            f"sample.batch_size={args.batch}",
            f"sample.num_batches_per_epoch={args.shards}",
            f"train.batch_size={args.batch * 2}",
            "train.timestep_fraction=0.01",  # one trained timestep per trajectory: a short update
            *overrides,
        ],
    )
    with contextlib.redirect_stdout(io.StringIO()):
        run_dir = train(config)
    return read_metrics(run_dir)[1:]


def med(metrics: list[dict], key: str) -> float:
    return statistics.median(m[key] for m in metrics)


def sleep_scorer(seconds: float, items: int) -> str:
    return (
        f"reward.scorers=[{{name: sleep, kwargs: {{batch_seconds: {seconds:.4f}, max_batch_size: {items}}}}}]"
    )


def overlap(args, out: Path) -> None:
    items = args.batch * 2  # nb_gen = 2
    queue = ["reward.transport=queue", "sample.pipeline=sync"]
    calib = run(args, out, "calibrate", *queue, sleep_scorer(0.0, items))
    per_shard = med(calib, "time_sampling_s") / args.shards
    queue_cost = med(calib, "time_scoring_s") / args.shards
    sleep = max(0.0, per_shard - queue_cost) if args.sleep is None else args.sleep
    scorer = sleep_scorer(sleep, items)
    # Rounds of one sync and one async run, the order alternating between rounds; each round gives
    # one paired ratio async / max(rollout, scoring), its rollout and scoring from its own sync run.
    rounds = []
    for r in range(args.rounds):
        runs = {}
        for mode in ("sync", "async") if r % 2 == 0 else ("async", "sync"):
            runs[mode] = run(
                args, out, f"{mode}{r}", "reward.transport=queue", f"sample.pipeline={mode}", scorer
            )
        rounds.append(runs)
    rows = []
    for runs in rounds:
        sync, asyn = runs["sync"], runs["async"]
        rollout, scoring = med(sync, "time_sampling_s"), med(sync, "time_scoring_s")
        rows.append(
            {
                "rollout": rollout,
                "scoring": scoring,
                "sync": med(sync, "time_sample_score_s"),
                "async": med(asyn, "time_sample_score_s"),
                "ideal": max(rollout, scoring),
                "a_sampling": med(asyn, "time_sampling_s"),
                "a_scoring": med(asyn, "time_scoring_s"),
                "a_overlap": med(asyn, "time_overlap_s"),
                "a_wait": med(asyn, "time_scoring_wait_s"),
                "epoch_sync": med(sync, "time_epoch_s"),
                "epoch_async": med(asyn, "time_epoch_s"),
            }
        )
    print(
        f"\n1. Overlap: tiny model, {args.shards} shards of {items} edits per epoch, {args.steps} DDIM steps; "
        f"sleep scorer over the Redis queue, {sleep * 1000:.0f} ms per shard (calibrated: rollout "
        f"{per_shard * 1000:.0f} ms/shard, queue {queue_cost * 1000:.0f} ms/shard). {args.rounds} rounds of a "
        f"sync and an async run (order alternating), each run the median of {args.epochs - 1} epochs after "
        f"a warm-up one. Times are per epoch, sampling + scoring only (time_sample_score_s), seconds."
    )
    print(
        "| round | rollout (sync, alone) | scoring (sync, alone) | sync epoch | async epoch | async / max(rollout, scoring) | async / sync |"
    )
    print("|---|---|---|---|---|---|---|")
    for i, x in enumerate(rows):
        print(
            f"| {i} | {x['rollout']:.2f} | {x['scoring']:.2f} | {x['sync']:.2f} | {x['async']:.2f} | "
            f"{x['async'] / x['ideal']:.3f} | {x['async'] / x['sync']:.3f} |"
        )
    print(
        "async runs, sampling / scoring / overlap / wait after the last shard (s): "
        + "; ".join(
            f"{x['a_sampling']:.2f} / {x['a_scoring']:.2f} / {x['a_overlap']:.2f} / {x['a_wait']:.2f}"
            for x in rows
        )
    )
    print(
        "whole epoch with the update, sync / async (s): "
        + "; ".join(f"{x['epoch_sync']:.2f} / {x['epoch_async']:.2f}" for x in rows)
    )
    paired = [x["async"] / x["ideal"] for x in rows]
    ratio = statistics.median(paired)
    verdict = "PASS" if ratio <= 1.15 else "FAIL"
    print(f"\nasync / max(rollout, scoring), paired by round: {spread(paired)} (target <= 1.15): {verdict}")
    print(f"async / sync, paired by round: {spread([x['async'] / x['sync'] for x in rows])}")
    own = [x["async"] / max(x["a_sampling"], x["a_scoring"]) for x in rows]
    print(f"async / max(the async run's own sampling, scoring), by round: {spread(own)}")


def scaling(args, out: Path) -> None:
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # 2 workers + the learner
    rows = []
    try:
        for workers in (1, 2):
            metrics = run(
                args,
                out,
                f"ray{workers}",
                "ray.enabled=true",
                f"ray.num_rollout_workers={workers}",
                "sample.pipeline=sync",
            )
            rows.append((workers, med(metrics, "time_sampling_s"), len(metrics)))
    finally:
        ray.shutdown()
    items = args.batch * 2 * args.shards
    print(
        f"\n2. Rollout scaling over Ray rollout workers (1 CPU each), {items} edits per epoch in "
        f"{args.shards} shards; median sampling time per epoch over {rows[0][2]} epochs after a warm-up one"
    )
    print("| rollout workers | sampling s/epoch | edits/s | speed-up |")
    print("|---|---|---|---|")
    for workers, seconds, _ in rows:
        print(f"| {workers} | {seconds:.2f} | {items / seconds:.1f} | {rows[0][1] / seconds:.2f}x |")
    print(f"(reported, not a target: this machine has {os.cpu_count()} cores)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=int, default=10, help="sampling batches per epoch")
    parser.add_argument("--batch", type=int, default=4, help="inputs per shard (2 edits each)")
    parser.add_argument("--steps", type=int, default=6, help="denoising steps")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of a sync and an async run")
    parser.add_argument(
        "--smoke", action="store_true", help="2 shards of 2, 2 steps, 2 epochs, 1 round, no Ray"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    parser.add_argument("--sleep", type=float, default=None, help="sleep per shard, s (default: calibrated)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray rollout-scaling part")
    args = parser.parse_args()
    if args.smoke:
        args.shards, args.batch, args.steps, args.epochs, args.rounds, args.no_ray = 2, 2, 2, 2, 1, True
    import torch

    # One thread: the other core is left to Redis and the reward server, as on a cluster where they
    # run elsewhere (and a second OpenMP thread on a busy 2-core machine slows sampling ~10x).
    torch.set_num_threads(args.threads)
    print(load_line("load before"))
    with tempfile.TemporaryDirectory(prefix="spie-overlap-") as tmp:
        overlap(args, Path(tmp))
        if not args.no_ray:
            scaling(args, Path(tmp))
    print(load_line("load after"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
