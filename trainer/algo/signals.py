"""From scores to learning signals: PPO's scalar reward and SPIE's (structural, semantic) signals."""

from __future__ import annotations

import torch

from sampler.rollout import Rollout
from trainer.algo.objectives import standardize
from trainer.config import RewardConfig, ScorerConfig, TrainConfig
from trainer.rewards.scores import Scores


def _by_role(scorers: tuple[ScorerConfig, ...], scores: Scores, role: str) -> torch.Tensor | None:
    """Weighted sum of the standardised scores of the scorers with `role`, or None if there are none."""
    parts = [
        sc.weight * standardize(torch.from_numpy(scores.values[sc.name])) for sc in scorers if sc.role == role
    ]
    return torch.stack(parts).sum(0) if parts else None


def reconstruction_mse(rollout: Rollout) -> torch.Tensor | None:
    """(N,) SPIE's reconstruction term: MSE between edit and source outside the edit mask (None without masks)."""
    if rollout.masks is None:
        return None
    keep = (~rollout.masks.bool()).unsqueeze(1).float().to(rollout.images.device)  # (N, 1, H, W)
    sq = (rollout.images - rollout.sources) ** 2 * keep
    return (sq.sum(dim=(1, 2, 3)) / (keep.sum(dim=(1, 2, 3)) * 3).clamp(min=1)).cpu().double()


def ppo_rewards(config: RewardConfig, scores: Scores) -> torch.Tensor:
    """(N,) scalar reward: the single scorer's raw score, or the weighted sum of standardised scores."""
    if len(config.scorers) == 1:
        return torch.from_numpy(scores.values[config.scorers[0].name]).double()
    return sum(sc.weight * standardize(torch.from_numpy(scores.values[sc.name])) for sc in config.scorers)


def spie_signals(
    config: RewardConfig, train: TrainConfig, scores: Scores, rollout: Rollout
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(structural, semantic) per-edit signals for SPIE's ranking, the semantic one minus
    `rec_lambda` x the reconstruction MSE outside the edit mask."""
    structural = _by_role(config.scorers, scores, "structural")
    semantic = _by_role(config.scorers, scores, "semantic")
    rec = reconstruction_mse(rollout)
    if rec is not None and train.rec_lambda > 0:
        penalty = train.rec_lambda * standardize(rec)
        semantic = -penalty if semantic is None else semantic - penalty
    return structural, semantic
