"""DiffusionNFT's KL term and old-policy schedule against the authors' lines, on fixed numbers, and
one real epoch of `train.objective: nft` on the tiny FLUX.1 Kontext with both.

Upstream: `NVlabs/DiffusionNFT` `scripts/train_nft_sd3.py` at commit 24af555: `return_decay`
(lines 169-189), the old weights' update after each epoch (lines 1034-1039) and the KL on the
velocity predictions (lines 966-970).
"""

from __future__ import annotations

import pytest
import torch

from trainer.algo.nft import old_policy_decay, output_kl


def _return_decay(step, decay_type):
    """Upstream's `return_decay`, lines 169-189."""
    if decay_type == 0:
        flat, uprate, uphold = 0, 0.0, 0.0
    elif decay_type == 1:
        flat, uprate, uphold = 0, 0.001, 0.5
    else:
        flat, uprate, uphold = 75, 0.0075, 0.999
    if step < flat:
        return 0.0
    return min((step - flat) * uprate, uphold)


@pytest.mark.parametrize("decay_type", [0, 1, 2])
def test_old_policy_decay_is_upstreams_return_decay(decay_type):
    for step in [0, 1, 2, 74, 75, 76, 100, 208, 499, 500, 501, 1000, 5000]:
        assert old_policy_decay(step, decay_type) == _return_decay(step, decay_type), step


def test_kl_is_the_squared_velocity_distance():
    """Lines 966-970: mean over non-batch dims of (v - v_ref)^2, then over the batch; the x0-space
    distance we had is sigma^2 times it (x0 = x_t - sigma v), so it vanished at low noise."""
    g = torch.Generator().manual_seed(0)
    v, v_ref = torch.randn(3, 4, 5, 6, generator=g), torch.randn(3, 4, 5, 6, generator=g)
    theirs = torch.mean(((v - v_ref) ** 2).mean(dim=tuple(range(1, v.ndim))))
    torch.testing.assert_close(output_kl(v, v_ref), theirs, rtol=1e-6, atol=0)
    x_t, sigma = torch.randn(3, 4, 5, 6, generator=g), torch.tensor([0.9, 0.5, 0.05]).view(-1, 1, 1, 1)
    x0_form = ((x_t - sigma * v - (x_t - sigma * v_ref)) ** 2).mean(dim=(1, 2, 3))
    per_item = ((v - v_ref) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(x0_form, sigma.view(-1) ** 2 * per_item, rtol=1e-4, atol=1e-6)


def test_an_nft_epoch_with_kl_and_decay_type_1(kontext_learner):
    """One epoch on the tiny Kontext (LoRA, DiffusionNFT's KL weight 1e-4, `decay_type` 1): the KL is
    logged and finite, and afterwards the old weights are d initial + (1 - d) current with
    d = 0.001 x the optimizer steps taken (upstream lines 576-579 and 1034-1039)."""
    policy, learner, r = kontext_learner(
        "train.objective=nft", "train.kl_coef=1e-4", "train.nft_decay_type=1", "train.batch_size=4"
    )
    before = learner.trainable_state()
    metrics = learner.train(r, torch.Generator().manual_seed(0))
    assert "kl" in metrics and torch.isfinite(torch.tensor(metrics["kl"]))
    steps = learner.nft_steps
    assert steps > 0
    d = 0.001 * steps
    after = learner.trainable_state()
    assert any(not torch.equal(before[n], after[n]) for n in after)
    for name, old in learner.nft_old.items():
        torch.testing.assert_close(old.cpu(), d * before[name] + (1 - d) * after[name], rtol=1e-5, atol=1e-7)


def test_a_resumed_run_keeps_the_old_weights(kontext_learner, tmp_path):
    """The old weights (decay type 1) and the optimizer-step count that sets the decay go into the
    checkpoint and come back in a fresh learner: a resumed run goes on as the straight one would
    (before, they restarted from the current weights)."""
    from trainer.run.checkpoint import load_checkpoint, save_checkpoint

    overrides = ("train.objective=nft", "train.kl_coef=1e-4", "train.nft_decay_type=1", "train.batch_size=4")
    _, learner, r = kontext_learner(*overrides)
    learner.train(r, torch.Generator().manual_seed(0))
    folder = save_checkpoint(
        tmp_path, learner.config, 0, learner.trainable_state(), learner.optimizer_checkpoint(), {}
    )
    trainable, state = load_checkpoint(folder)  # weights_only: plain tensors and numbers
    _, fresh, _ = kontext_learner(*overrides)
    fresh.load_trainable_state(trainable)
    fresh.load_optimizer_checkpoint(state["optimizer"])
    assert fresh.nft_steps == learner.nft_steps > 0
    assert fresh.nft_old.keys() == learner.nft_old.keys()
    for name, old in learner.nft_old.items():
        assert torch.equal(fresh.nft_old[name], old), name
        assert not torch.equal(old, learner.params[name].detach())  # a real average, not a copy
    # Both go on alike: one more epoch each gives the same old weights.
    learner.train(r, torch.Generator().manual_seed(1))
    fresh.train(r, torch.Generator().manual_seed(1))
    for name, old in learner.nft_old.items():
        torch.testing.assert_close(fresh.nft_old[name], old)
