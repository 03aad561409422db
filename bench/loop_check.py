"""End-to-end check of the RL loop: do the updates move the policy towards the edits ranked best?

1. Sample epoch 0's edits, score and rank them (or compute PPO advantages), run one epoch of updates on
   them, and compare each edit's log-probability (summed over the trained steps) before and after:
   the best-ranked edits should gain against the worst.
2. Train `--epochs` - 1 more epochs on fresh inputs as `spie train` does, then re-sample epoch 0's
   inputs from the same noise: the edits should now score higher (paired difference).
3. Report how far the policy's per-step log-ratio to the reference sits from SPIE's clamp.

The check is for the objectives that learn from a signal on sampled edits (`--objective`: `ppo`, the
default, or `spie_ranking`), whatever the config's own objective is (the demo's is AlignProp, which
backpropagates the reward instead and has no per-edit signal to check).

    .venv/bin/python bench/loop_check.py --config configs/demo.yaml --epochs 8 --set train.learning_rate=1e-3
    .venv/bin/python bench/loop_check.py --smoke   # the tiny preset, 2 epochs of one batch (the smoke test)
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds queue.py: take the folder off sys.path so `import queue` finds the standard library.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.paired import load_line  # noqa: E402
from trainer.algo.objectives import group_advantages, ranking_from_scores, ranks_of  # noqa: E402
from trainer.algo.signals import ppo_rewards, spie_signals  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.data.inputs import load_inputs  # noqa: E402
from trainer.engine.local import LocalEngine  # noqa: E402
from trainer.engine.shards import epoch_generator, plan_epoch  # noqa: E402
from trainer.rewards.inprocess import InProcessRewards  # noqa: E402


@torch.no_grad()
def step_log_probs(engine, rollout, reference: bool = False) -> torch.Tensor:
    """(N, S) log-probs of every stochastic step of the recorded trajectories."""
    steps = torch.nonzero(rollout.stochastic.cpu()).view(-1).tolist()
    policy = engine.policy
    out = []
    ctx = engine.learner._reference() if reference else torch.no_grad()
    with policy.eval_mode(), ctx:
        for j in steps:
            out.append(policy.step_log_prob(rollout, j).cpu().double())
    return torch.stack(out, dim=1)


def signal(config, rollout, scores, grouped: bool) -> torch.Tensor:
    """Attach the signal to the batch (advantages, or the ranking of a `grouped` objective); returns
    each group's edits, best first."""
    t = config.train
    if not grouped:
        adv = group_advantages(ppo_rewards(config.reward, scores), rollout.group, t.min_group_size).float()
        # order within each group by advantage, best first, for the report
        rows = []
        for g in torch.unique(rollout.group):
            idx = torch.nonzero(rollout.group == g).view(-1)
            rows.append(idx[torch.argsort(adv[idx], descending=True, stable=True)])
        rollout.advantages = adv
        return torch.stack(rows)
    structural, semantic = spie_signals(config.reward, t, scores, rollout)
    ranking = ranking_from_scores(structural, semantic, rollout.group, t.score_alpha)
    rollout.ranks = ranks_of(ranking, len(rollout))
    return ranking


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument(
        "--objective",
        choices=("ppo", "spie_ranking"),
        default="ppo",
        help="the objective whose loop is checked",
    )
    ap.add_argument("--smoke", action="store_true", help="configs/tiny.yaml, 2 epochs of one small batch")
    args = ap.parse_args()
    if args.smoke:
        args.config, args.epochs = "configs/tiny.yaml", 2
        args.set = [
            "sample.batch_size=2",
            "sample.num_batches_per_epoch=1",
            "sample.num_steps=3",
            "train.batch_size=4",
            "model.use_lora=true",
            *args.set,
        ]
    overrides = [
        "ray.enabled=false",
        "reward.transport=inprocess",
        f"train.objective={args.objective}",
        *args.set,
    ]
    config = load_config(args.config, overrides)
    t0 = time.perf_counter()
    engine = LocalEngine(config)
    rewards = InProcessRewards(config.reward)
    inputs = load_inputs(config.data, config.model.resolution, seed=config.run.seed)
    sem = next(sc.name for sc in config.reward.scorers if sc.role == "semantic")

    gen = epoch_generator(config.run.seed, 0)
    shards0 = plan_epoch(inputs, config, 0, gen, engine.latent_shape)
    r0 = engine.sample(shards0, False)
    s0 = rewards.score(r0)
    order = signal(config, r0, s0, engine.learner.objective.grouped)
    before = step_log_probs(engine, r0)
    metrics = engine.learn(r0, gen, False)
    after = step_log_probs(engine, r0)
    d = (after - before).sum(1)  # (N,) change of the trajectory log-prob
    by_pos = d[order]  # (G, K) best first
    print(f"[check] one epoch of updates ({config.train.objective}), loss {metrics['loss']:.4g}")
    print(
        "[check] change of trajectory log-prob by rank (best .. worst): "
        + "  ".join(f"{float(v):+.4g}" for v in by_pos.mean(0))
    )
    print(
        f"[check] best gained more than worst in {float((by_pos[:, 0] > by_pos[:, -1]).double().mean()):.0%} "
        f"of {by_pos.shape[0]} groups; per-step |dlogp| mean {float((after - before).abs().mean()):.3g}"
    )

    for epoch in range(1, args.epochs):
        gen = epoch_generator(config.run.seed, epoch)
        shards = plan_epoch(inputs, config, epoch, gen, engine.latent_shape)
        r = engine.sample(shards, False)
        s = rewards.score(r)
        signal(config, r, s, engine.learner.objective.grouped)
        m = engine.learn(r, gen, False)
        succ = s.details.get(f"{sem}.success")
        print(
            f"[check] epoch {epoch}: {sem} {s.values[sem].mean():.4f} success "
            f"{np.nanmean(succ) if succ is not None else float('nan'):.3f} loss {m['loss']:.4g}"
        )

    r1 = engine.sample(shards0, False)  # same inputs, same noise, trained weights
    s1 = rewards.score(r1)
    for key, a, b in [
        (sem, s0.values[sem], s1.values[sem]),
        ("success", s0.details.get(f"{sem}.success"), s1.details.get(f"{sem}.success")),
    ]:
        if a is None:
            continue
        diff = b - a
        se = diff.std(ddof=1) / math.sqrt(len(diff))
        print(
            f"[check] epoch-0 inputs re-sampled after training: {key} {a.mean():.4f} -> {b.mean():.4f} "
            f"({diff.mean():+.4f} +- {1.96 * se:.4f})"
        )
    if not config.model.use_lora and getattr(engine.learner, "_reference_unet", None) is None:
        print("[check] no frozen reference (full fine-tuning without KL): log-ratio report skipped")
        print(f"[check] {time.perf_counter() - t0:.0f}s")
        print(load_line())
        return
    lr = step_log_probs(engine, r1) - step_log_probs(engine, r1, reference=True)
    eps = config.train.eps
    out = ((lr > math.log(1 + eps)) | (lr < math.log(1 - eps))).double().mean()
    print(
        f"[check] per-step log-ratio to reference on fresh samples: mean |.| {float(lr.abs().mean()):.3g}, "
        f"max |.| {float(lr.abs().max()):.3g}, outside the clamp [1-eps, 1+eps]: {float(out):.1%}"
    )
    print(f"[check] {time.perf_counter() - t0:.0f}s")
    print(load_line())


if __name__ == "__main__":
    main()
