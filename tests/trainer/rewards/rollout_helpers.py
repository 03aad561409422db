"""Helpers for the trainer's reward-transport tests (a uniquely named module, importable from test
files): rollouts that hold only images to score."""

from __future__ import annotations

import torch

from sampler.rollout import Rollout


def image_rollout(n: int, size: int = 16, masked: bool = False) -> Rollout:
    """n items of seeded random edits and sources (size x size) with empty denoising state, for the
    reward transports; with `masked`, every item's edit mask is rows 3:10, columns 5:12."""
    g = torch.Generator().manual_seed(0)
    masks = None
    if masked:
        masks = torch.zeros((n, size, size), dtype=torch.bool)
        masks[:, 3:10, 5:12] = True
    return Rollout(
        latents=torch.zeros((n, 2, 4, 2, 2)),
        step_index=torch.zeros((n, 0), dtype=torch.long),
        log_probs=torch.zeros((n, 0)),
        stochastic=torch.zeros(0, dtype=torch.bool),
        text_embeds=torch.zeros((n, 1, 1)),
        image_latents=torch.zeros((n, 4, 2, 2)),
        images=torch.rand((n, 3, size, size), generator=g),
        sources=torch.rand((n, 3, size, size), generator=g),
        group=torch.arange(n),
        instructions=["keep the rest"] * n,
        masks=masks,
        item_ids=[f"i{i}" for i in range(n)],
    )
