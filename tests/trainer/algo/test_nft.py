"""DiffusionNFT's loss against its authors' lines on fixed numbers."""

from __future__ import annotations

import torch

from trainer.algo.nft import nft_loss, optimality


def _upstream_policy_loss(xt, t, forward_prediction, old_prediction, x0, advantages, beta, adv_clip_max):
    """NVlabs/DiffusionNFT scripts/train_nft_sd3.py (commit 24af555), lines 910-960, in velocity space."""
    t_expanded = t.view(-1, *([1] * (len(x0.shape) - 1)))
    advantages_clip = torch.clamp(advantages, -adv_clip_max, adv_clip_max)
    normalized_advantages_clip = (advantages_clip / adv_clip_max) / 2.0 + 0.5
    r = torch.clamp(normalized_advantages_clip, 0, 1)
    positive_prediction = beta * forward_prediction + (1 - beta) * old_prediction.detach()
    implicit_negative_prediction = (1.0 + beta) * old_prediction.detach() - beta * forward_prediction
    x0_prediction = xt - t_expanded * positive_prediction
    with torch.no_grad():
        weight_factor = (
            torch.abs(x0_prediction.double() - x0.double())
            .mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
            .clip(min=0.00001)
        )
    positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=tuple(range(1, x0.ndim)))
    negative_x0_prediction = xt - t_expanded * implicit_negative_prediction
    with torch.no_grad():
        negative_weight_factor = (
            torch.abs(negative_x0_prediction.double() - x0.double())
            .mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
            .clip(min=0.00001)
        )
    negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(
        dim=tuple(range(1, x0.ndim))
    )
    ori_policy_loss = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
    return (ori_policy_loss * adv_clip_max).mean()


def test_nft_loss_equals_the_upstream_velocity_form():
    """Our x0-space loss (x0_hat = x_t - t v) gives DiffusionNFT's loss and gradient, for beta 1 and 0.1,
    with advantages inside and beyond the clip."""
    g = torch.Generator().manual_seed(0)
    x0, noise, v_old = (torch.randn(4, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.9, 0.5, 0.3, 0.05], dtype=torch.float64)
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    adv = torch.tensor([2.0, -0.5, 7.0, -9.0], dtype=torch.float64)
    for beta in (1.0, 0.1):
        v = (v_old + 0.3 * torch.randn(v_old.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
        theirs = _upstream_policy_loss(xt, t, v, v_old, x0, adv, beta, 5.0)
        (g_theirs,) = torch.autograd.grad(theirs, v)
        tt = t.view(-1, 1, 1, 1)
        ours, info = nft_loss(xt - tt * v, xt - tt * v_old, x0, adv, beta, 5.0)
        (g_ours,) = torch.autograd.grad(ours, v)
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)
        assert set(info) == {"nft_positive", "nft_negative", "old_deviate"}


def test_optimality_maps_the_clipped_advantage_onto_zero_one():
    r = optimality(torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0, 10.0]), 5.0)
    assert r.tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]
