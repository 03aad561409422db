"""Numbers that say whether an update can move the policy, logged every epoch.

For the ranking objective, the loss alone says little: with beta = 0.1 and the ratio clamped to
[1 - eps, 1 + eps], K tied edits give log K! whatever happens. What does move is how far the policy's
log-ratios to the reference have gone, how many are pinned at the clamp (their gradient is zero),
and whether the policy already prefers the edits the ranking prefers.

For PPO, `ratio_diagnostics` counts the ratios the clip acts on, on each side, and the ratios that
collapsed: with a clip range c >= 1 the lower clamp 1 - c <= 0 can never act, so a ratio falling to
0.01 left `clipfrac` at 0 (issue 25: approx_kl 59 with clipfrac 0.00 on the tiny preset, seed 1).
"""

from __future__ import annotations

import math

import torch


def ranking_diagnostics(
    log_prob: torch.Tensor, ref_log_prob: torch.Tensor, ranking: torch.Tensor, eps: float
) -> dict[str, torch.Tensor]:
    """Diagnostics of one ranking step.

    Args:
        log_prob: (N,) current policy (no grad needed).
        ref_log_prob: (N,) frozen reference.
        ranking: (G, K) indices into the N items, best first.
        eps: the clamp of the ratio, [1 - eps, 1 + eps].

    Returns:
        clamped_frac: fraction of items whose ratio lies outside the clamp (no gradient);
        abs_log_ratio: mean |log pi - log pi_ref|;
        pref_agreement: over the pairs (better, worse) of each group, the fraction where the
            policy's log-ratio is higher for the better edit (ties count one half); 0.5 is indifference.
    """
    log_ratio = (log_prob - ref_log_prob).double()
    lo, hi = math.log(1 - eps), math.log(1 + eps)
    s = log_ratio[ranking]  # (G, K), best first
    k = s.shape[1]
    better, worse = torch.triu_indices(k, k, offset=1)
    diff = s[:, better] - s[:, worse]
    agree = (diff > 0).double() + 0.5 * (diff == 0).double()
    return {
        "clamped_frac": ((log_ratio < lo) | (log_ratio > hi)).double().mean(),
        "abs_log_ratio": log_ratio.abs().mean(),
        "pref_agreement": agree.mean(),
    }


# The epoch line flags a collapse when more than this fraction of ratios fell below 1 / (1 + c).
# configs/quickstart.yaml (clip_range 1.0), seed 1: 37-38 % in the epochs where it fell back
# (approx_kl 4-52), 21-34 % while it learned; every seed's first two epochs read 38 % (approx_kl 12-25).
COLLAPSE_FLAG = 0.35


def ratio_diagnostics(log_ratio: torch.Tensor, clip_range: float) -> dict[str, torch.Tensor]:
    """PPO's ratio diagnostics for one step of B trajectories.

    Args:
        log_ratio: (B,) log pi_new - log pi_old (no grad needed).
        clip_range: c; the loss clamps the ratio to [1 - c, 1 + c].

    Returns:
        approx_kl: 0.5 E[(log r)^2];
        clipfrac: fraction outside [1 - c, 1 + c] on either side (= clipfrac_low + clipfrac_high);
        clipfrac_low / clipfrac_high: below 1 - c / above 1 + c;
        ratio_collapse: fraction below 1 / (1 + c), the mirror of the upper clip in log space (as far
            below 1 as the upper clip is above it); it counts collapsing ratios when 1 - c <= 0.
    """
    lr = log_ratio.detach().double()
    ratio = torch.exp(lr)
    low = (ratio < 1 - clip_range).double().mean()
    high = (ratio > 1 + clip_range).double().mean()
    return {
        "approx_kl": 0.5 * (lr**2).mean(),
        "clipfrac": low + high,
        "clipfrac_low": low,
        "clipfrac_high": high,
        "ratio_collapse": (lr < -math.log1p(clip_range)).double().mean(),
    }


def ratio_fields(record: dict) -> list[str]:
    """The epoch line's PPO part from an epoch record (means over its steps): approx_kl, clipfrac
    with its two sides, and a flag when ratios collapsed."""
    if "approx_kl" not in record:
        return []
    line = f"approx_kl={record['approx_kl']:.2g} clipfrac={record['clipfrac']:.2f}"
    if "clipfrac_low" in record:
        line += f" (low {record['clipfrac_low']:.2f} / high {record['clipfrac_high']:.2f})"
    collapse = record.get("ratio_collapse", 0.0)
    if collapse > COLLAPSE_FLAG:
        line += f" RATIO COLLAPSE: {collapse:.0%} of ratios fell below 1/(1+clip_range)"
    return [line]
