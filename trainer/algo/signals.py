"""From scores to learning signals: PPO's scalar reward and SPIE's (structural, semantic) signals."""

from __future__ import annotations

import torch

from sampler.rollout import Rollout
from trainer.algo.objectives import group_advantages, standardize
from trainer.config import Config, RewardConfig, TrainConfig
from trainer.rewards.scores import Scores


def reconstruction_mse(rollout: Rollout) -> torch.Tensor | None:
    """(N,) SPIE's reconstruction term: MSE between edit and source outside the edit mask (None without masks).

    As SPIE's `semantic_score` (reward_modeling/score_functions.py, lines 117-124): squared error
    averaged over the channels, then over the pixels outside the mask; where the mask covers the
    whole image (or nothing), over all pixels.
    """
    if rollout.masks is None:
        return None
    keep = (~rollout.masks.bool()).to(rollout.images.device)  # (N, H, W)
    empty = ~keep.flatten(1).any(dim=1)
    keep[empty] = True
    keep = keep.unsqueeze(1).float()  # (N, 1, H, W)
    sq = ((rollout.images - rollout.sources) ** 2).mean(dim=1, keepdim=True) * keep
    return (sq.sum(dim=(1, 2, 3)) / keep.sum(dim=(1, 2, 3))).cpu().double()


def sampling_batches(rollout: Rollout, batches_per_process: int | None = None) -> list[torch.Tensor]:
    """Index tensors of the rollout's sampling steps, from the item ids "e<E>-b<B>-i<I>"; the whole
    rollout as one batch when the ids do not say.

    Without `batches_per_process`, each shard B is its own batch. With it (= sample.num_batches_per_epoch),
    shard B is sampling batch B mod it of learner B // it (the learners train contiguous shares,
    `trainer.engine.ray.learners.split_for_learners`), and the shards of one sampling batch across the
    learners form one gathered batch, as SPIE gathers one sampling batch from every process
    (`ebenarous/SPIE` `scripts/train.py`, lines 355 and 358, commit 4c87694). With one learner every
    shard is still alone (B mod it = B), in the same order.
    """
    keys = []
    for item in rollout.item_ids:
        parts = item.split("-")
        if len(parts) != 3 or not parts[1].startswith("b") or not parts[1][1:].isdigit():
            return [torch.arange(len(rollout))]
        b = int(parts[1][1:])
        keys.append(parts[0] + "-" + str(b if batches_per_process is None else b % batches_per_process))
    if len(keys) != len(rollout):
        return [torch.arange(len(rollout))]
    order = list(dict.fromkeys(keys))
    return [torch.tensor([i for i, k in enumerate(keys) if k == key]) for key in order]


def standardize_per_batch(x: torch.Tensor, batches: list[torch.Tensor]) -> torch.Tensor:
    """(N,) standardised within each sampling batch (SPIE standardises each gathered sampling batch)."""
    out = torch.zeros_like(x)
    for idx in batches:
        out[idx] = standardize(x[idx])
    return out


def ppo_rewards(config: RewardConfig, scores: Scores) -> torch.Tensor:
    """(N,) scalar reward: the single scorer's raw score, or the weighted sum of standardised scores."""
    if len(config.scorers) == 1:
        return torch.from_numpy(scores.values[config.scorers[0].name]).double()
    return sum(sc.weight * standardize(torch.from_numpy(scores.values[sc.name])) for sc in config.scorers)


def attach_group_advantages(config: Config, rollout: Rollout, scores: Scores, stats) -> None:
    """`rollout.advantages` (N,): `ppo_rewards` normalised within each group (GRPO; PPO's and
    DiffusionNFT's signal); groups under `train.min_group_size` use the one scorer's running
    statistics (`stats`, a `RewardStats`), else the batch's."""
    t = config.train
    reward = ppo_rewards(config.reward, scores)
    single = len(config.reward.scorers) == 1
    fallback = stats.mean_std(config.reward.scorers[0].name) if single else None
    rollout.advantages = group_advantages(
        reward, rollout.group, t.min_group_size, fallback, scale=t.advantage_scale
    ).float()


def spie_signals(
    config: RewardConfig,
    train: TrainConfig,
    scores: Scores,
    rollout: Rollout,
    batches_per_process: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(structural, semantic) per-edit signals for SPIE's ranking, as SPIE computes them.

    SPIE (scripts/train.py, lines 343-359; reward_modeling/score_functions.py, line 127): the
    semantic score gets `rec_lambda` x the RAW reconstruction MSE outside the edit mask (SPIE's scores
    are distances, lower is better, so it adds; ours are oriented higher-is-better, so we subtract),
    and then each score is standardised once, over its sampling batch gathered from every process
    (`sampling_batches` with `batches_per_process`: over the learners with Ray). Each scorer of a role gives
    `weight` x that standardised score (weight 1 and one scorer per role is exactly SPIE); several
    scorers of one role are summed. `ranking_from_scores` adds them without standardising again.
    """
    batches = sampling_batches(rollout, batches_per_process)
    rec = reconstruction_mse(rollout) if train.rec_lambda > 0 else None
    out = {}
    for role in ("structural", "semantic"):
        parts = []
        for sc in config.scorers:
            if sc.role != role:
                continue
            raw = torch.from_numpy(scores.values[sc.name]).double()
            if role == "semantic" and rec is not None:
                raw = raw - train.rec_lambda * rec
            parts.append(sc.weight * standardize_per_batch(raw, batches))
        if role == "semantic" and not parts and rec is not None:
            parts.append(standardize_per_batch(-train.rec_lambda * rec, batches))
        out[role] = torch.stack(parts).sum(0) if parts else None
    return out["structural"], out["semantic"]
