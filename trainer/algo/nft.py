"""DiffusionNFT's loss (Zheng et al. 2025, arXiv 2509.16117, eq. 8 and Algorithm 1), in x0 space.

Upstream (`NVlabs/DiffusionNFT` `scripts/train_nft_sd3.py`, lines 910-960 at commit 24af555) works on
velocities: with the current prediction v, the sampling ("old") policy's v_old and beta,
    v+ = beta v + (1 - beta) v_old,        v- = (1 + beta) v_old - beta v,
    x0+ = x_t - t v+,  x0- = x_t - t v-,
    L = adv_clip_max * mean[ r |x0+ - x0|^2 / w+ + (1 - r) |x0- - x0|^2 / w- ] / beta,
with r = clamp(clamp(A, -c, c) / c / 2 + 0.5, 0, 1) the advantage mapped to an optimality
probability and w = mean |x0+- - x0| (no gradient, at least 1e-5) the adaptive weights. Since x0_hat =
x_t - t v is affine in v with unit weight on x_t, the same mixtures of x0 predictions give the same
x0+ and x0-, so this module takes x0 predictions: any parameterisation (a flow model's velocity, an
epsilon-predicting UNet's noise) reduces to them, which is how DiffusionNFT applies to
InstructPix2Pix.
"""

from __future__ import annotations

import torch


def optimality(advantages: torch.Tensor, adv_clip_max: float) -> torch.Tensor:
    """(B,) advantages -> (B,) r in [0, 1]: clip to +-c, then map [-c, c] linearly onto [0, 1]."""
    clipped = advantages.clamp(-adv_clip_max, adv_clip_max)
    return (clipped / adv_clip_max / 2 + 0.5).clamp(0, 1)


def _adaptive_mse(pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,) |pred - x0|^2 / mean|pred - x0|, the weight without gradient."""
    dims = tuple(range(1, x0.ndim))
    with torch.no_grad():
        weight = (pred.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clip(min=1e-5)
    return ((pred - x0) ** 2 / weight).mean(dim=dims)


def nft_loss(
    x0_pred: torch.Tensor,
    x0_old: torch.Tensor,
    x0: torch.Tensor,
    advantages: torch.Tensor,
    beta: float,
    adv_clip_max: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DiffusionNFT policy loss for one noise level of B items.

    Args:
        x0_pred: (B, C, h, w) the current model's x0 prediction (with grad).
        x0_old: (B, C, h, w) the sampling policy's prediction from the same x_t (no grad).
        x0: (B, C, h, w) the clean final latents the rollout produced.
        advantages: (B,) group-normalised advantages.
        beta: the implicit policies' strength.
        adv_clip_max: c, the advantage clip (also the loss scale, as upstream).

    Returns:
        The scalar loss and diagnostics: the positive and negative terms and old_deviate.
    """
    r = optimality(advantages.to(x0_pred.dtype), adv_clip_max)
    x0_old = x0_old.detach()
    positive = beta * x0_pred + (1 - beta) * x0_old
    negative = (1 + beta) * x0_old - beta * x0_pred
    pos_loss, neg_loss = _adaptive_mse(positive, x0), _adaptive_mse(negative, x0)
    per_item = r * pos_loss / beta + (1 - r) * neg_loss / beta
    loss = (per_item * adv_clip_max).mean()
    with torch.no_grad():
        info = {
            "nft_positive": pos_loss.mean(),
            "nft_negative": neg_loss.mean(),
            "old_deviate": ((x0_pred - x0_old) ** 2).mean(),
        }
    return loss, info


# DiffusionNFT's schedules of the old policy's decay, `return_decay` (`NVlabs/DiffusionNFT`
# `scripts/train_nft_sd3.py`, lines 169-189 at commit 24af555): (flat, rate, cap) per `decay_type`.
DECAY_SCHEDULES = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}


def old_policy_decay(step: int, decay_type: int) -> float:
    """The weight of the old policy's weights in their update after an epoch, old <- d old + (1 - d)
    current (upstream lines 1034-1039), at `step` optimizer steps so far: 0 for `step` < flat, then
    min((step - flat) rate, cap). Type 0 is always 0 (the old policy is the current one, the one that
    sampled); type 1 (upstream's default) grows to an even average over 500 steps."""
    flat, rate, cap = DECAY_SCHEDULES[decay_type]
    return 0.0 if step < flat else min((step - flat) * rate, cap)


def output_kl(output: torch.Tensor, ref_output: torch.Tensor) -> torch.Tensor:
    """DiffusionNFT's KL term: the squared distance of the network's outputs (velocities for a flow
    model) to the reference's, averaged over the non-batch dims, then over the batch (upstream lines
    966-970). (B, ...) x 2 -> scalar."""
    per_item = ((output - ref_output.detach()) ** 2).mean(dim=tuple(range(1, output.ndim)))
    return per_item.mean()
