"""The single-controller training loop: sample, score, turn scores into signals, update, log, save.

One epoch (DDPO's outer loop):
1. draw `sample.num_batches_per_epoch` batches of inputs and sample `nb_gen` edits of each;
2. score every edit with every configured scorer;
3. PPO: per-group advantages of the reward; SPIE ranking: the best-to-worst order of each group;
4. `train.num_inner_epochs` passes of the objective;
5. write metrics, a sample grid and a checkpoint.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sampler.rollout import Rollout
from trainer.checkpoint import find_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from trainer.config import Config, dump_config
from trainer.data import Inputs, load_inputs
from trainer.errors import UserError
from trainer.learner import Learner, build_policy
from trainer.objectives import group_advantages, ranking_from_scores
from trainer.pipeline import ScoringThread, sample_and_score
from trainer.rewards import Scores, ppo_rewards, spie_signals
from trainer.runlog import RunLog
from trainer.services import make_rewards


class RewardStats:
    """Running mean and variance of each scorer's scores across epochs (Welford), kept in checkpoints.

    PPO normalises groups smaller than `train.min_group_size` with these statistics.
    """

    def __init__(self) -> None:
        self.stats: dict[str, list[float]] = {}  # name -> [count, mean, M2]

    def update(self, name: str, values: np.ndarray) -> None:
        count, mean, m2 = self.stats.get(name, [0.0, 0.0, 0.0])
        for v in values[np.isfinite(values)].tolist():
            count += 1
            delta = v - mean
            mean += delta / count
            m2 += delta * (v - mean)
        self.stats[name] = [count, mean, m2]

    def mean_std(self, name: str) -> tuple[float, float] | None:
        count, mean, m2 = self.stats.get(name, [0.0, 0.0, 0.0])
        if count < 2:
            return None
        return mean, math.sqrt(m2 / (count - 1))

    def state_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.stats.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.stats = {k: [float(x) for x in v] for k, v in state.items()}


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The epoch's random stream (noise, input draws, shuffles): a pure function of (seed, epoch), so
    a resumed run draws exactly what an uninterrupted one would."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def make_run_dir(config: Config) -> Path:
    name = config.run.name or datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(config.run.output_dir) / name
    if (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists():
        raise UserError(
            f"run folder {run_dir} already holds a run: continue it with --resume {run_dir}, or set run.name"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


@dataclass
class Shard:
    """One sampling batch of an epoch: the unit of work handed to a rollout worker.

    Attributes:
        epoch: the epoch it belongs to.
        index: its position b in 0 .. sample.num_batches_per_epoch - 1.
        inputs: sample.batch_size (source, instruction[, mask, exemplar]) inputs.
        noise_state: the epoch generator's state where this shard's noise starts (a uint8 tensor).
    """

    epoch: int
    index: int
    inputs: Inputs
    noise_state: torch.Tensor


def latent_shape(policy, resolution: int) -> tuple[int, int, int]:
    """(C, h, w) of the policy's latents for resolution x resolution images."""
    vae = policy.c.vae.config
    factor = 2 ** (len(vae.block_out_channels) - 1)
    return (int(vae.latent_channels), resolution // factor, resolution // factor)


def plan_epoch(
    inputs: Inputs, config: Config, epoch: int, generator: torch.Generator, latents: tuple[int, int, int]
) -> list[Shard]:
    """Draw the epoch's shards from the epoch generator, as one process sampling them in turn would.

    For each shard: draw its inputs, record the generator state, then skip over the noise its
    rollout draws from that state (x_T, then one draw per step: `EditPolicy.rollout`). Any worker
    can then sample any shard, and the edits, and the generator the learner gets afterwards, are
    those of the single-process loop, whatever the number of workers.

    Args:
        latents: (C, h, w) latent shape (`latent_shape`).
    """
    s = config.sample
    n = s.batch_size * s.nb_gen
    shards = []
    for b in range(config.batches_per_epoch):  # x learners with Ray: the sizes are per process
        pick = torch.randint(len(inputs), (s.batch_size,), generator=generator)
        shards.append(Shard(epoch, b, inputs.take(pick), generator.get_state()))
        torch.randn((s.batch_size if s.shared_noise else n, *latents), generator=generator)
        for _ in range(s.num_steps):
            torch.randn((n, *latents), generator=generator)
    return shards


def sample_shard(policy, shard: Shard, config: Config, progress: bool, policy_version: int = 0) -> Rollout:
    """Sample nb_gen edits of each of a shard's inputs from the shard's noise: batch_size x nb_gen items."""
    s = config.sample
    generator = torch.Generator()
    generator.set_state(shard.noise_state)
    with policy.eval_mode():
        r = policy.rollout(
            shard.inputs.sources,
            shard.inputs.instructions,
            nb_gen=s.nb_gen,
            generator=generator,
            shared_noise=s.shared_noise,
            exemplars=shard.inputs.exemplars,
            masks=shard.inputs.masks,
            progress=progress,
            policy_version=policy_version,
        )
    r.item_ids = [f"e{shard.epoch}-b{shard.index}-i{i}" for i in range(len(r))]
    meta = getattr(shard.inputs, "metadata", None)
    if meta is not None:
        r.metadata = [dict(m) for m in meta for _ in range(s.nb_gen)]
    return r


def sample_epoch(
    policy, inputs, config: Config, epoch: int, generator: torch.Generator, progress: bool
) -> Rollout:
    """Sample the epoch's rollouts in this process: num_batches_per_epoch shards, concatenated in order."""
    shards = plan_epoch(inputs, config, epoch, generator, latent_shape(policy, config.model.resolution))
    return Rollout.concat([sample_shard(policy, sh, config, progress) for sh in shards])


class LocalEngine:
    """Sampling and learning in this process: one policy that both samples and trains (the default).

    `trainer.ray_loop.RayEngine` has the same methods and runs them on Ray actors instead.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.policy = build_policy(config)
        self.learner = Learner(config, self.policy)
        self.latent_shape = latent_shape(self.policy, config.model.resolution)

    @property
    def version(self) -> int:
        return self.learner.version

    def restore(self, trainable: dict[str, torch.Tensor], optimizer: dict, version: int) -> None:
        self.learner.load_trainable_state(trainable)
        self.learner.optimizer.load_state_dict(optimizer)
        self.learner.version = version

    def sample(self, shards: list[Shard], progress: bool) -> Rollout:
        parts = [sample_shard(self.policy, sh, self.config, progress, self.version) for sh in shards]
        return Rollout.concat(parts)

    def learn(self, rollout: Rollout, generator: torch.Generator, progress: bool, **signal) -> dict:
        """One epoch of updates; `signal` is `advantages=` (PPO) or `ranking=` (SPIE ranking)."""
        return self.learner.train(rollout, generator, progress=progress, **signal)

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(trainable weights, optimizer state) for `save_checkpoint`."""
        return self.learner.trainable_state(), self.learner.optimizer.state_dict()

    def metrics(self) -> dict[str, float]:
        """Engine-specific numbers for the epoch's metrics record."""
        return {}

    def close(self) -> None:
        pass


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
    run_dir = Path(resume) if resume else make_run_dir(config)
    rewards = make_rewards(config, run_id=run_dir.name)
    log = engine = scorer = None
    try:
        print(f"[spie] run folder: {run_dir}")
        print(f"[spie] {config.summary()}")
        engine = make_engine(config)
        stats = RewardStats()
        log = RunLog(run_dir)
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
        t_cfg = config.train
        # sample.pipeline=async: shards are scored on a background thread while the next are sampled.
        scorer = ScoringThread(rewards) if config.sample.pipeline == "async" else None
        for epoch in range(start, config.run.num_epochs):
            gen = epoch_generator(config.run.seed, epoch)
            t0 = time.perf_counter()
            shards = plan_epoch(inputs, config, epoch, gen, engine.latent_shape)
            rollout, scores, times = sample_and_score(engine, rewards, shards, config, progress, scorer)
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
            if t_cfg.objective == "ppo":
                reward = ppo_rewards(config.reward, scores_ok)
                fallback = (
                    stats.mean_std(config.reward.scorers[0].name) if len(config.reward.scorers) == 1 else None
                )
                adv = group_advantages(reward, rollout_ok.group, t_cfg.min_group_size, fallback).float()
                metrics = engine.learn(rollout_ok, gen, progress, advantages=adv)
            else:
                structural, semantic = spie_signals(config.reward, t_cfg, scores_ok, rollout_ok)
                ranking = ranking_from_scores(structural, semantic, rollout_ok.group, t_cfg.score_alpha)
                metrics = engine.learn(rollout_ok, gen, progress, ranking=ranking)
            t3 = time.perf_counter()
            record.update(metrics)
            record.update(engine.metrics())
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
            log.log(record)
            if config.run.image_log_freq and epoch % config.run.image_log_freq == 0:
                m = config.sample.batch_size
                log.save_grid(
                    epoch,
                    rollout.sources[:: config.sample.nb_gen][:m],
                    rollout.images[: m * config.sample.nb_gen],
                    config.sample.nb_gen,
                )
            means = ", ".join(f"{k}={v:.4f}" for k, v in record.items() if k.endswith(".mean"))
            print(f"[spie] epoch {epoch}: {means}, loss={record['loss']:.4g}, {t3 - t0:.1f}s")
            last = epoch == config.run.num_epochs - 1
            if last or (epoch + 1) % config.run.save_freq == 0:
                trainable, optimizer = engine.checkpoint_state()
                save_checkpoint(
                    run_dir,
                    config,
                    epoch,
                    trainable,
                    optimizer,
                    {"policy_version": engine.version, "reward_stats": stats.state_dict()},
                )
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
    from trainer.plots import reward_curve

    lines = [
        f"metrics:      {run_dir / 'metrics.jsonl'}",
        f"checkpoints:  {run_dir / 'checkpoints'}",
        f"samples:      {run_dir / 'samples'}",
        f"TensorBoard:  tensorboard --logdir {run_dir / 'tensorboard'}",
        f"reward curve: {reward_curve(run_dir / 'metrics.jsonl', run_dir / 'reward_curve.png')}",
    ]
    e = config.eval
    if e.after_training:
        from trainer.evaluate import evaluate_models, format_table

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
        from trainer.ray_loop import RayEngine

        return RayEngine(config)
    return LocalEngine(config)


def ensure_run_config(run_dir: Path) -> Path:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.yaml)")
    return path
