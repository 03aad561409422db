"""Numbers that say whether an update can move the policy, logged every epoch.

For the ranking objective, the loss alone says little: with beta = 0.1 and the ratio clamped to
[1 - eps, 1 + eps], K tied edits give log K! whatever happens. What does move is how far the policy's
log-ratios to the reference have gone, how many are pinned at the clamp (their gradient is zero),
and whether the policy already prefers the edits the ranking prefers.
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
