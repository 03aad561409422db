"""Autoscaled reward replicas against fixed counts (`python bench/autoscale.py`), on Ray actors.

Load with the shape of training: an epoch is `--cycles` rounds of (a burst of `--burst` jobs
submitted at once, as a rollout batch's edits; wait until all are scored; then `--learn-s` seconds
with nothing to score, while the learner works). The scorer is `sleep`, latency-bound: a fixed
`--batch-s` per batch of up to `--batch-size` items, a stand-in for a GPU model. Three
configurations, interleaved, `--repeats` times each, every run starting from fresh actors:

- fixed 1:    min_replicas = max_replicas = 1
- fixed max:  min_replicas = max_replicas = --max-replicas
- autoscaled: min_replicas 1, max_replicas --max-replicas, target_drain_s --target-drain-s

Reports the medians of the epoch time and of the replica-seconds (actors held, starting and
draining included, integrated by the autoscaler every `interval_s`). Aim: autoscaled within 1.15x of
fixed max's epoch time at no more than 0.6x its replica-seconds.

Measured with the defaults (burst 256, learner 12 s, 3 cycles, sleep 0.5 s per 8, max 4; medians
of 3; a replica actor takes 2.0-3.3 s to start here): deploy/README.md has the figures. On 7 Dec
2026, quiet (load 0.2-0.9): fixed 1 84.33 s / 84.5 replica-s; fixed 4 48.17 s / 193.3; autoscaled
57.55 s / 120.8: 1.195x the epoch time at 0.625x the replica-seconds (both aims missed); at load
0.5-2.3 the same day 1.165x / 0.600x. The figures from before the fix of the service-rate estimate
(1.140x / 0.573x at load 9-12; `--learn-s 6`: 1.238x / 0.774x) were measured with a rate 3x too
high. With short idle phases the actors' start-up and the scale-down cooldown dominate.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/queue.py would shadow the stdlib's `queue`: take this folder off sys.path.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import ray  # noqa: E402

from bench.paired import load_line  # noqa: E402
from reward_servers.images import make_item  # noqa: E402
from reward_servers.queue.embedded import EmbeddedRedis  # noqa: E402
from trainer.config.reward_scaling import RayRewardConfig, ScorerReplicas  # noqa: E402
from trainer.config.schema import RewardConfig, ScorerConfig  # noqa: E402
from trainer.rewards.queue import QueueClientConfig, RewardClient  # noqa: E402
from trainer.rewards.ray_replicas import RayReplicaSet  # noqa: E402


def items(n: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        edit = np.full((8, 8, 3), int(rng.integers(0, 256)), dtype=np.uint8)
        out.append(make_item(f"it{i}", edit, edit, "brighter"))
    return out


def reward_config(args, lo: int, hi: int) -> RewardConfig:
    spec = ScorerReplicas(
        scorer="sleep",
        num_cpus=0.1,
        min_replicas=lo,
        max_replicas=hi,
        target_drain_s=args.target_drain_s,
        scale_up_cooldown_s=args.up_cooldown_s,
        scale_down_cooldown_s=args.down_cooldown_s,
        drain_grace_s=30.0,
    )
    kwargs = {"batch_seconds": args.batch_s, "max_batch_size": args.batch_size}
    return RewardConfig(
        scorers=(ScorerConfig(name="sleep", kwargs=kwargs),),
        transport="queue",
        launch="ray",
        server_start_timeout_s=120.0,
        ray=RayRewardConfig(scorers=(spec,), interval_s=args.interval_s, queue={"block_ms": 250}),
    )


def run_epoch(args, name: str, lo: int, hi: int, seed: int) -> dict:
    redis = EmbeddedRedis(tcp=True).start()
    replicas = RayReplicaSet(reward_config(args, lo, hi), redis.url, redis.password)
    config = QueueClientConfig(url=redis.url, deadline_s=300, resubmits=0, poll_s=0.1)
    client = RewardClient(["sleep"], config, password=redis.password)
    scaler = replicas.autoscaler
    try:
        replicas.metrics()  # forget the start-up
        rs0, t0 = scaler.replica_s_total["sleep"], time.monotonic()
        scoring = []
        for cycle in range(args.cycles):
            ts = time.monotonic()
            scores = client.score_items(items(args.burst, seed * 100 + cycle))
            scoring.append(time.monotonic() - ts)
            assert all(e is None for e in scores.errors["sleep"]), "a job failed"
            time.sleep(args.learn_s)
        epoch_s = time.monotonic() - t0
        time.sleep(args.interval_s * 1.5)  # the last tick's share
        replica_s = scaler.replica_s_total["sleep"] - rs0
        m = replicas.metrics()
        counts = client.take_counts()
    finally:
        client.close()
        replicas.close()
        redis.stop()
    ups = sum(e["action"] == "up" for e in m["reward/scaling_events"])
    downs = sum(e["action"] == "down" for e in m["reward/scaling_events"])
    return {
        "config": name,
        "epoch_s": round(epoch_s, 2),
        "scoring_s": [round(s, 2) for s in scoring],
        "replica_s": round(replica_s, 1),
        "peak": m["reward/sleep/replicas_max"],
        "ups": ups,
        "downs": downs,
        "resubmitted": counts.get("queue.resubmitted", 0),
        "events": m["reward/scaling_events"] if args.events else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=256, help="jobs per burst (a rollout batch)")
    parser.add_argument("--learn-s", type=float, default=12.0, help="idle seconds after each burst")
    parser.add_argument("--cycles", type=int, default=3, help="bursts per epoch")
    parser.add_argument("--only", help="run only this configuration (fixed 1, fixed N, autoscaled)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration")
    parser.add_argument("--batch-s", type=float, default=0.5, help="sleep scorer seconds per batch")
    parser.add_argument("--batch-size", type=int, default=8, help="sleep scorer batch size")
    parser.add_argument("--max-replicas", type=int, default=4)
    parser.add_argument("--target-drain-s", type=float, default=2.0)
    parser.add_argument("--up-cooldown-s", type=float, default=0.5)
    parser.add_argument("--down-cooldown-s", type=float, default=1.0)
    parser.add_argument("--interval-s", type=float, default=0.25)
    parser.add_argument("--events", action="store_true", help="print each run's scaling events")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="one short epoch of each configuration, 2 replicas at most (the smoke test)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.burst, args.learn_s, args.cycles, args.repeats, args.batch_s = 16, 0.5, 1, 1, 0.05
        args.max_replicas, args.num_cpus = 2, 2
    print(load_line("load before"))
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    configs = [("fixed 1", 1, 1), (f"fixed {args.max_replicas}", args.max_replicas, args.max_replicas)]
    configs.append(("autoscaled", 1, args.max_replicas))
    rows = []
    try:
        for rep in range(args.repeats):
            for name, lo, hi in configs:  # interleaved: drift on the machine hits all alike
                if args.only and name != args.only:
                    continue
                row = run_epoch(args, name, lo, hi, seed=rep)
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        ray.shutdown()
    print(
        f"\nburst {args.burst} jobs, {args.learn_s:g}s learner, {args.cycles} cycles/epoch, "
        f"sleep {args.batch_s:g}s per batch of {args.batch_size}; medians of {args.repeats}"
    )
    medians = {}
    for name, _, _ in configs:
        mine = [r for r in rows if r["config"] == name]
        if not mine:  # --only ran another configuration
            continue
        medians[name] = (
            statistics.median(r["epoch_s"] for r in mine),
            statistics.median(r["replica_s"] for r in mine),
        )
        print(f"{name:>12}: epoch {medians[name][0]:7.2f} s   replica-seconds {medians[name][1]:7.1f}")
    top = medians.get(f"fixed {args.max_replicas}")
    auto = medians.get("autoscaled")
    if top is None or auto is None:
        return
    print(
        f"autoscaled / fixed {args.max_replicas}: epoch time {auto[0] / top[0]:.3f}x (aim <= 1.15), "
        f"replica-seconds {auto[1] / top[1]:.3f}x (aim <= 0.6)"
    )


if __name__ == "__main__":
    main()
    print(load_line("load after"))
