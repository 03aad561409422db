"""AlignProp's math (Prabhudesai et al. 2023, arXiv 2310.03739): the truncation draw and the loss.

- Truncated backpropagation (paper Sec. 4.2, "randomized truncation"): gradients flow through the
  last K of the T denoising steps only. `mihirp1998/AlignProp` `sd_pipeline.py` draws the cut per
  batch (`backprop_strategy` "fixed", "uniform" over [min, max), "gaussian") and detaches the UNet's
  prediction before it; here K itself is drawn uniformly from [k_min, k_max] (both ends included)
  with the epoch's generator, so a resumed run draws the same K.
- Loss: minus the weighted reward of the sampled edits, averaged over the batch (AlignProp's
  `aesthetic_loss_fn` returns -reward x grad_scale; the scale here is each scorer's weight).
"""

from __future__ import annotations

import torch


def backprop_steps(k_min: int, k_max: int, num_steps: int, generator: torch.Generator) -> int:
    """K, the steps a batch backpropagates through: uniform on [k_min, k_max] (0 for k_max: all T
    steps), one draw from `generator` even when k_min == k_max, so the random stream does not depend
    on the range."""
    hi = num_steps if k_max == 0 else k_max
    lo = min(k_min, hi)
    if not 1 <= lo <= hi <= num_steps:
        raise ValueError(f"backprop steps range [{k_min}, {k_max}] is not within [1, {num_steps}]")
    return lo + int(torch.randint(hi - lo + 1, (1,), generator=generator))


def reward_loss(
    rewards: dict[str, torch.Tensor], weights: dict[str, float], loss_coeff: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, reward): reward = sum_s weight_s x reward_s, (N,); loss = -loss_coeff x mean(reward).

    `loss_coeff` is AlignProp's `config.train.loss_coeff` (`mihirp1998/AlignProp` `main.py`, lines
    505-507 at commit 7f4503f; `alignprop_trainer.py`, lines 330-331 at b22918a: loss.mean() x 0.01).

    Args:
        rewards: scorer -> (N,) differentiable rewards, higher is better.
        weights: scorer -> weight.
        loss_coeff: the loss's scale (`train.alignprop_loss_coeff`).
    """
    total = sum(weights[name] * r for name, r in rewards.items())
    return -loss_coeff * total.mean(), total
