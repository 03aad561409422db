"""The single-controller training loop: sample, score, turn scores into signals, update, log, save.

One epoch (DDPO's outer loop), as the objective (`trainer.registry`, `trainer.objectives.base`)
gathers it; by default:
1. draw `sample.num_batches_per_epoch` batches of inputs and sample `nb_gen` edits of each;
2. score every edit with every configured scorer;
3. the objective's signal (PPO: per-group advantages of the reward; SPIE ranking: the best-to-worst
   order of each group);
4. `train.num_inner_epochs` passes of the objective;
5. write metrics, a sample grid and a checkpoint.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sampler.rollout import Rollout
from trainer.algo.signals import ppo_rewards
from trainer.algo.stats import RewardStats
from trainer.config import Config, dump_config, to_dict, with_overrides
from trainer.data.inputs import load_inputs
from trainer.engine.local import LocalEngine
from trainer.engine.shards import epoch_generator, plan_epoch, probe_shards
from trainer.errors import UserError
from trainer.guard.check import Guards
from trainer.pipeline import ScoringThread
from trainer.registry import make_objective
from trainer.rewards.grounding import ground_missing_masks
from trainer.rewards.scores import Scores
from trainer.rewards.services import make_rewards
from trainer.run.checkpoint import find_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from trainer.run.durable import check_durable
from trainer.run.log import RunLog


def with_local_paths(config: Config) -> Config:
    """The config with a local base model's folder made absolute, so the run (its config.yaml, its
    checkpoints) finds the model from any working folder and never mistakes it for a hub id."""
    m = config.model
    if m.pretrained != "tiny" and Path(m.pretrained).expanduser().is_dir():
        model = dataclasses.replace(m, pretrained=str(Path(m.pretrained).expanduser().resolve()))
        return dataclasses.replace(config, model=model)
    return config


def filter_groups(config: Config, rollout: Rollout, scores: Scores) -> tuple[Rollout, Scores, dict]:
    """Drop the groups `train.filter_min_std` / `filter_max_mean` exclude (Edit-R1's filter); returns
    the kept batch and `groups_zero_var` (fraction of groups whose reward does not vary: nothing to
    learn from them) and `groups_filtered`."""
    t = config.train
    reward = ppo_rewards(config.reward, scores).double()
    groups = torch.unique(rollout.group)
    keep_groups, zero = [], 0
    for g in groups:
        r = reward[rollout.group == g]
        std = float(r.std()) if r.numel() > 1 else 0.0
        zero += std < 1e-12
        if std >= t.filter_min_std and float(r.mean()) <= t.filter_max_mean:
            keep_groups.append(int(g))
    info = {"groups_zero_var": zero / max(1, len(groups)), "groups_filtered": len(groups) - len(keep_groups)}
    if len(keep_groups) == len(groups):
        return rollout, scores, info
    keep = torch.nonzero(torch.isin(rollout.group, torch.tensor(keep_groups, dtype=torch.long))).view(-1)
    return rollout.select(keep), scores.select(keep.tolist()), info


def make_probe(config: Config) -> list:
    """The held-out probe set (`eval.probe_items` inputs of `eval.data_overrides`' data), as shards
    with fixed per-item noise (`eval.seed`)."""
    e = config.eval
    data = with_overrides(config, list(e.data_overrides)).data
    inputs = load_inputs(data, config.model.resolution, seed=config.run.seed)
    inputs = inputs.take(torch.arange(min(e.probe_items, len(inputs))))
    return probe_shards(inputs, config.sample.batch_size, e.seed)


def epoch_line(objective, record: dict[str, Any], seconds: float) -> str:
    """One readable line per epoch: the scores, what the update did (the objective's fields), and
    the probe when measured."""
    parts = [f"{k[:-5]}={v:.4f}" for k, v in record.items() if k.endswith(".mean") and "probe" not in k]
    parts += [f"{k}={v:.3f}" for k, v in record.items() if k.endswith(".success") and "probe" not in k]
    parts += objective.epoch_fields(record)
    probe_parts = [
        f"{k[6:]}={v:.4f}"
        for k, v in record.items()
        if k.startswith("probe.") and k.endswith((".mean", ".success"))
    ]
    if probe_parts:
        parts.append("probe: " + ", ".join(probe_parts))
    return f"[spie] epoch {record['epoch']}: " + ", ".join(parts) + f", {seconds:.1f}s"


def make_run_dir(config: Config) -> Path:
    name = config.run.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.run.output_dir) / name
    check_durable(run_dir)
    if (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists():
        raise UserError(
            f"run folder {run_dir} already holds a run: continue it with --resume {run_dir}, or set run.name"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def drop_failed(rollout: Rollout, scores: Scores) -> tuple[Rollout, Scores, int]:
    """Remove whole groups that contain an item some scorer failed on; returns the count removed."""
    failed = {i for _, i, _ in scores.failed()}
    if not failed:
        return rollout, scores, 0
    bad_groups = {int(rollout.group[i]) for i in failed}
    keep = [i for i in range(len(rollout)) if int(rollout.group[i]) not in bad_groups]
    if not keep:
        name, i, err = scores.failed()[0]
        raise RuntimeError(
            f"every edit failed scoring; first: scorer {name}, item {rollout.item_ids[i]}: {err}"
        )
    return rollout.select(keep), scores.select(keep), len(rollout) - len(keep)


def train(config: Config, resume: str | Path | None = None, progress: bool | None = None) -> Path:
    """Run (or resume) a training job; returns the run folder."""
    progress = (not config.run.quiet) if progress is None else progress
    # Inputs and scorers first: a broken image or an unknown scorer stops the run before any work.
    inputs = load_inputs(config.data, config.model.resolution, seed=config.run.seed)
    config = with_local_paths(config)
    run_dir = Path(resume) if resume else make_run_dir(config)
    inputs.masks = ground_missing_masks(
        config.reward.grounding, inputs.sources, inputs.instructions, inputs.metadata, inputs.masks, run_dir
    )
    rewards = make_rewards(config, run_id=run_dir.name)
    log = engine = scorer = None
    try:
        objective = make_objective(config)
        # What the objective needs of the scorers (AlignProp: their differentiable forms, refused,
        # naming them, when one has none).
        objective.start(rewards)
        print(f"[spie] run folder: {run_dir}")
        print(f"[spie] {config.summary()}")
        engine = make_engine(config)
        stats = RewardStats()
        log = RunLog(run_dir, config.run.log_with, to_dict(config))
        start = 0
        if resume:
            folder = find_checkpoint(run_dir)
            trainable, state = load_checkpoint(folder)
            engine.restore(trainable, state["optimizer"], int(state.get("policy_version", 0)))
            stats.load_state_dict(state.get("reward_stats", {}))
            restore_rng(state)
            start = int(state["epoch"]) + 1
            log.truncate_after(start - 1)
            print(f"[spie] resumed from {folder} at epoch {start}")
        dump_config(config, run_dir / "config.yaml")
        # sample.pipeline=async: shards are scored on a background thread while the next are sampled.
        background = config.sample.pipeline == "async" and objective.background_scoring
        scorer = ScoringThread(rewards) if background else None
        guards = Guards(config, run_dir)
        probe_set = make_probe(config) if guards.wanted else None
        # The starting policy's probe (its image statistics: the guards' reference).
        initial = guards.probe(engine, rewards, probe_set) if probe_set and start == 0 else {}
        for epoch in range(start, config.run.num_epochs):
            gen = epoch_generator(config.run.seed, epoch)
            t0 = time.perf_counter()
            shards = plan_epoch(inputs, config, epoch, gen, engine.latent_shape)
            gathered = objective.gather(engine, rewards, shards, gen, progress, scorer)
            rollout, scores, times = gathered.rollout, gathered.scores, gathered.times
            t2 = time.perf_counter()
            record: dict[str, Any] = {
                "epoch": epoch,
                "policy_version": engine.version,
                # How many updates behind the learner the weights that sampled this batch are.
                "rollout_staleness": engine.version - rollout.policy_version,
            }
            for name, values in scores.values.items():
                finite = values[np.isfinite(values)]
                record[f"{name}.mean"] = float(finite.mean()) if finite.size else float("nan")
                record[f"{name}.std"] = float(finite.std()) if finite.size else float("nan")
                stats.update(name, values)
            for key, values in scores.details.items():  # e.g. "oracle_edit.success": its epoch mean
                finite = values[np.isfinite(values)]
                if finite.size:
                    record[key] = float(finite.mean())
            rollout_ok, scores_ok, dropped = drop_failed(rollout, scores)
            if gathered.learned is not None:  # the objective learned while gathering
                record.update(gathered.learned)
            else:
                rollout_ok, scores_ok, group_info = filter_groups(config, rollout_ok, scores_ok)
                record.update(group_info)
                batch = objective.training_batch(gathered, rollout_ok, scores_ok, stats)
                if len(batch):
                    record.update(engine.learn(batch, gen, progress))
            t3 = time.perf_counter()
            record.update(engine.metrics())
            record.update(rewards.metrics())
            record.update(
                {
                    "items": len(rollout),
                    "items_dropped": dropped,
                    "samples_per_s": len(rollout) / max(times["time_sampling_s"], 1e-9),
                    **times,
                    "time_training_s": t3 - t2,
                    "time_epoch_s": t3 - t0,
                }
            )
            if config.run.image_log_freq and epoch % config.run.image_log_freq == 0:
                m = config.sample.batch_size
                log.save_grid(
                    epoch,
                    rollout.sources[:: config.sample.nb_gen][:m],
                    rollout.images[: m * config.sample.nb_gen],
                    config.sample.nb_gen,
                    notes=[
                        {"instruction": text, **row}
                        for text, row in zip(
                            rollout.instructions, scores.rows(m * config.sample.nb_gen), strict=False
                        )
                    ],
                )
            last = epoch == config.run.num_epochs - 1
            if probe_set and guards.due(epoch, last):
                # After this epoch's update: the policy of version epoch + 1 on the fixed probe set.
                record.update(guards.probe(engine, rewards, probe_set))
                record.update({f"initial_{k}": v for k, v in initial.items()})
                initial = {}
            alarms, stop = guards.check(record)
            log.log(record)
            print(epoch_line(objective, record, t3 - t0))
            for line in alarms:
                print(line)
            if last or stop or (epoch + 1) % config.run.save_freq == 0:
                trainable, optimizer = engine.checkpoint_state()
                save_checkpoint(
                    run_dir,
                    config,
                    epoch,
                    trainable,
                    optimizer,
                    {"policy_version": engine.version, "reward_stats": stats.state_dict()},
                )
            if stop:
                break
    finally:
        if scorer is not None:
            scorer.close()
        if log is not None:
            log.close()
        if engine is not None:
            engine.close()
        rewards.close()
    final_report(config, run_dir, progress)
    return run_dir


def final_report(config: Config, run_dir: Path, progress: bool) -> None:
    """After the last epoch: the reward curve, the held-out comparison (`eval.after_training`), and
    where every output is."""
    from trainer.run.plots import reward_curve

    lines = [
        f"metrics:      {run_dir / 'metrics.jsonl'}",
        f"checkpoints:  {run_dir / 'checkpoints'}",
        f"samples:      {run_dir / 'samples'}",
        f"TensorBoard:  tensorboard --logdir {run_dir / 'tensorboard'}",
        f"reward curve: {reward_curve(run_dir / 'metrics.jsonl', run_dir / 'reward_curve.png')}",
    ]
    e = config.eval
    if e.after_training:
        from trainer.evaluate.compare import evaluate_models, format_table

        print(f"[spie] evaluating {config.model.pretrained} against the trained model on held-out inputs")
        summary = evaluate_models(
            [config.model.pretrained, str(run_dir)],
            config=config,
            out_dir=run_dir,
            num_items=e.num_items,
            seed=e.seed,
            overrides=e.data_overrides,
            labels=["start", "trained"],
            resamples=e.resamples,
            progress=progress,
        )
        print(format_table(summary))
        lines += [
            f"evaluation:   {run_dir / 'eval.json'}",
            f"before/after: {run_dir / 'before_after.png'}",
        ]
    print("[spie] done:\n  " + "\n  ".join(lines))


def make_engine(config: Config):
    """The engine that samples and learns: this process, or Ray actors with `ray.enabled`."""
    if config.ray.enabled:
        from trainer.engine.ray.engine import RayEngine

        return RayEngine(config)
    return LocalEngine(config)


def ensure_run_config(run_dir: Path) -> Path:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.yaml)")
    return path
