"""SPO's step-wise preferences: the judge's value, the win/lose pair of each pool, the DPO-style loss.

Step-by-step preference optimisation (Liang et al. 2024, arXiv 2406.04314, eq. 6 and 7; code in
RockeyCoss/SPO): at one denoising step, the best and the worst of K candidates x_{t-1}^k drawn from the
same x_t form a pair when the judge separates them clearly enough, and the policy is trained to raise
the (clamped) likelihood ratio to the frozen reference of the winner over the loser:

    loss = -log sigmoid(beta log clamp(pi(w)/pi_ref(w), 1 - eps, 1 + eps)
                        - beta log clamp(pi(l)/pi_ref(l), 1 - eps, 1 + eps)).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from sampler.rollout import Rollout
from trainer.config import RewardConfig
from trainer.rewards.scores import Scores


def judge_values(config: RewardConfig, scores: Scores) -> torch.Tensor:
    """(N,) the judge's value of each candidate: the sum over `reward.scorers` of weight x the raw
    score (oriented higher-is-better), NaN where a scorer failed. Raw, not standardised: SPO's
    threshold compares the values themselves (scale them with the scorer's weight)."""
    total = sum(sc.weight * np.asarray(scores.values[sc.name], dtype=np.float64) for sc in config.scorers)
    return torch.from_numpy(np.asarray(total, dtype=np.float64))


def preference_pairs(
    values: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The win/lose pair of each of M pools of K candidates.

    As SPO's `preference_score_compare` (spo/preference_models/compare_funcs.py): best and worst of
    the pool, kept when softmax([v_best, v_worst]) differs by more than `threshold`, i.e.
    tanh((v_best - v_worst) / 2) > threshold. A pool with a NaN (a failed score) gives no pair.

    Args:
        values: (M, K) judge values, higher is better.

    Returns:
        win (M,) and lose (M,) long candidate positions in 0..K-1, valid (M,) bool.
    """
    v = values.double()
    finite = torch.isfinite(v).all(dim=1)
    v = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
    win, lose = v.argmax(dim=1), v.argmin(dim=1)
    rows = torch.arange(v.shape[0])
    p = torch.softmax(torch.stack([v[rows, win], v[rows, lose]], dim=1), dim=1)
    valid = finite & (p[:, 0] - p[:, 1] > threshold) & (win != lose)
    return win, lose, valid


def pair_batch(candidates: Rollout, values: torch.Tensor, threshold: float, pool_size: int) -> Rollout:
    """The training batch of one step's pools: 2 P items (winner then loser of each valid pair),
    `group` the pair, `ranks` 0 for the winner and 1 for the loser.

    Args:
        candidates: M K one-step candidates, input-major (`sampler.step_pool`).
        values: (M K,) their judge values.
    """
    m = len(candidates) // pool_size
    win, lose, valid = preference_pairs(values.view(m, pool_size), threshold)
    base = torch.arange(m) * pool_size
    keep = torch.nonzero(valid).view(-1)
    index = torch.stack([base[keep] + win[keep], base[keep] + lose[keep]], dim=1).reshape(-1)
    pairs = candidates.select(index)
    pairs.group = torch.arange(len(keep)).repeat_interleave(2)
    pairs.ranks = torch.tensor([0, 1]).repeat(len(keep))
    return pairs


def spo_loss(
    log_prob: torch.Tensor, ref_log_prob: torch.Tensor, pairs: torch.Tensor, beta: float, eps: float
) -> torch.Tensor:
    """SPO's loss for P pairs of one step (RockeyCoss/SPO train_scripts/train_spo.py, lines 584-586).

    Args:
        log_prob: (N,) current policy (with grad); ref_log_prob: (N,) frozen reference.
        pairs: (P, 2) batch indices, winner first.

    Returns:
        The scalar loss, mean over pairs.
    """
    log_ratio = (log_prob - ref_log_prob).clamp(math.log(1 - eps), math.log(1 + eps))
    s = beta * log_ratio[pairs]  # (P, 2)
    return -F.logsigmoid(s[:, 0] - s[:, 1]).mean()
