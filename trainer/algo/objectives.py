"""RL objectives on per-step log-probabilities: advantages, PPO-clip, SPIE's Plackett-Luce ranking, KL.

References:
- DDPO (Black et al. 2023, arXiv 2305.13301), eq. 4 and ddpo-pytorch `scripts/train.py`: PPO-clip on
  the ratio of per-step likelihoods under the current and the sampling policy.
- GRPO (Shao et al. 2024, arXiv 2402.03300), sec. 4.1.2: advantages normalised within the group of
  outputs for the same input.
- D3PO (Yang et al. 2023, arXiv 2311.13231) and SPIE (arXiv 2504.12833, sec. 3): the ratio to a frozen
  reference, clamped to [1 - eps, 1 + eps] and raised to beta, inside a Plackett-Luce likelihood of the
  ranking of the nb_gen edits of one input.
"""

from __future__ import annotations

import math

import torch

from trainer.algo.diagnostics import ratio_diagnostics


def standardize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(N,) -> (N,) zero mean, unit std over the batch (all zeros when the batch is constant)."""
    if x.numel() < 2:
        return torch.zeros_like(x)
    return (x - x.mean()) / (x.std() + eps)


def group_advantages(
    rewards: torch.Tensor,
    group: torch.Tensor,
    min_group_size: int = 2,
    fallback: tuple[float, float] | None = None,
    eps: float = 1e-8,
    scale: str = "group",
) -> torch.Tensor:
    """Per-group normalised advantages (GRPO-style).

    Args:
        rewards: (N,) rewards of the whole gathered batch.
        group: (N,) long, the input each reward belongs to.
        min_group_size: groups smaller than this are normalised with batch (or `fallback`) statistics.
        fallback: (mean, std) to use for small groups instead of the batch's own (e.g. running stats).
        scale: "group" divides each group by its own std (GRPO, Flow-GRPO); "batch" divides every
            group's centred rewards by one std over the whole batch (Dr. GRPO, Liu et al. 2025,
            arXiv 2503.20783, sec. 3.1, drops the per-group std): a group whose edits score alike
            then gets small advantages instead of its noise blown up to unit scale.

    Returns:
        (N,) advantages (reward - group mean) / (group std + eps), or / (batch std of the centred
        rewards + eps) with scale "batch".
    """
    if scale not in ("group", "batch"):
        raise ValueError(f"scale must be 'group' or 'batch', got {scale!r}")
    adv = torch.empty_like(rewards)
    if fallback is not None:
        b_mean, b_std = fallback
    else:
        b_mean = float(rewards.mean())
        b_std = float(rewards.std()) if rewards.numel() > 1 else 1.0
    for g in torch.unique(group):
        sel = group == g
        r = rewards[sel]
        if r.numel() >= max(2, min_group_size):
            adv[sel] = (r - r.mean()) if scale == "batch" else (r - r.mean()) / (r.std() + eps)
        else:
            adv[sel] = (r - b_mean) if scale == "batch" else (r - b_mean) / (b_std + eps)
    if scale == "batch":
        adv = adv / (adv.std() + eps) if adv.numel() > 1 else adv
    return adv


def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    adv_clip_max: float = math.inf,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DDPO's clipped surrogate for one denoising step of B trajectories.

    loss = mean(max(-A r, -A clip(r, 1 - c, 1 + c))), r = exp(log_prob - old_log_prob).

    Args:
        log_prob: (B,) under the current weights (with grad).
        old_log_prob: (B,) recorded under the sampling weights.
        advantages: (B,).
        clip_range: c.
        adv_clip_max: advantages are clamped to [-adv_clip_max, adv_clip_max].

    Returns:
        The scalar loss and diagnostics (`trainer.algo.diagnostics.ratio_diagnostics`): approx_kl,
        clipfrac on both sides and each side, ratio_collapse.
    """
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        info = ratio_diagnostics(log_ratio, clip_range)
    return loss, info


def ranking_from_scores(
    structural: torch.Tensor | None,
    semantic: torch.Tensor | None,
    group: torch.Tensor,
    score_alpha: float = 1.0,
) -> torch.Tensor:
    """SPIE's preference: rank the edits of each input by structural + alpha x semantic.

    As SPIE's scripts/train.py line 362, the signals are added as they come: they are already
    standardised per sampling batch (`trainer.algo.signals.spie_signals`), and are not standardised
    again here (that would undo the scorers' weights).

    Args:
        structural: (N,) standardised structural signal (higher is better) or None.
        semantic: (N,) standardised semantic signal (higher is better) or None.
        group: (N,) long; every group must have the same size K and be contiguous in the batch.

    Returns:
        (G, K) long: for each group, the batch indices of its edits from best to worst.
    """
    total = torch.zeros(group.shape[0], dtype=torch.float64)
    if structural is not None:
        total += structural.double()
    if semantic is not None:
        total += score_alpha * semantic.double()
    rows = []
    for g in torch.unique(group):
        idx = torch.nonzero(group == g).view(-1)
        order = torch.argsort(total[idx], descending=True, stable=True)
        rows.append(idx[order])
    sizes = {len(r) for r in rows}
    if len(sizes) != 1:
        raise ValueError(f"ranking needs equal group sizes, got {sorted(sizes)}")
    return torch.stack(rows)


def ranks_of(ranking: torch.Tensor, n: int) -> torch.Tensor:
    """(G, K) best-first batch indices -> (N,) long: each edit's place in its group, 0 = best."""
    ranks = torch.full((n,), -1, dtype=torch.long)
    ranks[ranking.reshape(-1)] = torch.arange(ranking.shape[1]).repeat(ranking.shape[0])
    return ranks


def ranking_of(group: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """(N,) group ids and (N,) per-edit ranks -> (G, K) batch indices of each group, best first.

    The inverse of `ranks_of` for whole groups: the ranking of whatever sub-batch a learner holds.
    """
    rows = []
    for g in torch.unique(group.cpu()):
        idx = torch.nonzero(group.cpu() == g).view(-1)
        rows.append(idx[torch.argsort(ranks.cpu()[idx], stable=True)])
    sizes = {len(r) for r in rows}
    if len(sizes) != 1:
        raise ValueError(f"ranking needs equal group sizes, got {sorted(sizes)}")
    return torch.stack(rows)


def plackett_luce_loss(
    log_prob: torch.Tensor, ref_log_prob: torch.Tensor, ranking: torch.Tensor, beta: float, eps: float
) -> torch.Tensor:
    """SPIE/D3PO ranking loss for one denoising step.

    With s_i = beta * log(clamp(pi(x_i) / pi_ref(x_i), 1 - eps, 1 + eps)) and the edits of a group
    ordered best first, the Plackett-Luce negative log-likelihood is
        -sum_k [ s_(k) - log sum_{m >= k} exp(s_(m)) ],
    averaged over groups.

    Args:
        log_prob: (N,) current policy (with grad).
        ref_log_prob: (N,) frozen reference.
        ranking: (G, K) batch indices, best first.
    """
    log_ratio = (log_prob - ref_log_prob).clamp(math.log(1 - eps), math.log(1 + eps))
    s = beta * log_ratio[ranking]  # (G, K)
    # log sum_{m >= k} exp(s_m): a reversed cumulative logsumexp.
    tail = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)
    return -(s - tail).sum(dim=-1).mean()


def kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor) -> torch.Tensor:
    """Per-step KL estimate to the reference, 0.5 E[(log pi - log pi_ref)^2]. (B,) -> scalar."""
    return 0.5 * ((log_prob - ref_log_prob) ** 2).mean()


def step_mean_kl(mean: torch.Tensor, ref_mean: torch.Tensor, kl_std: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's KL to the reference for a flow editor's step: mean over non-batch dims of
    (mean - mean_ref)^2, divided by 2 std_t^2, then averaged over the batch (`yifan123/flow_grpo`
    `scripts/train_sd3.py`, lines 895-896 at commit ac4c86e, the same lines at 54809b5); std_t is
    the step function's `std_dev_t` (`FlowMatchSDE.kl_std`); 0 where it is 0.

    Shapes: mean, ref_mean (B, C, h, w) (ref_mean without grad), kl_std (B, 1, 1, 1) -> scalar.
    """
    dims = tuple(range(1, mean.ndim))
    sq = ((mean - ref_mean.detach()) ** 2).mean(dim=dims, keepdim=True)
    safe = torch.where(kl_std > 0, kl_std, torch.ones_like(kl_std))
    kl = torch.where(kl_std > 0, sq / (2 * safe**2), torch.zeros_like(sq))
    return kl.mean()
