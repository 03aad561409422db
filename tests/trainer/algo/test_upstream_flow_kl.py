"""Flow-GRPO's KL for PPO / GRPO on the flow editors, against the authors' lines on fixed numbers,
and in the learner's step loss on the tiny FLUX.1 Kontext.

Upstream: `yifan123/flow_grpo` `scripts/train_sd3.py`, lines 895-897 at commit ac4c86e (the same
lines at 54809b5): kl = mean over (C, h, w) of (prev_sample_mean - prev_sample_mean_ref)^2 /
(2 std_dev_t^2), averaged over the batch, loss += beta kl; the reference is the transformer with its
LoRA adapter disabled, and std_dev_t is what `sde_step_with_logprob` returns
(`flow_grpo/diffusers_patch/sd3_sde_with_logprob.py` at 54809b5: line 50, a sqrt(sigma / (1 -
sigma)) for "sde"; line 71, sigma_prev sin(a pi / 2) for "cps").
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sampler.editors.flow_sde import FlowMatchSDE
from trainer.algo.objectives import step_mean_kl


def _upstream_kl(mean, mean_ref, std_dev_t):
    """Lines 895-896."""
    kl_loss = ((mean - mean_ref) ** 2).mean(dim=(1, 2, 3), keepdim=True) / (2 * std_dev_t**2)
    return torch.mean(kl_loss)


def _upstream_std_dev_t(sigma, sigma_prev, sigma_max, a, kind):
    """Lines 50 and 71 of the step function."""
    if kind == "sde":
        return torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * a
    return sigma_prev * math.sin(a * math.pi / 2)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_step_mean_kl_is_flow_grpos(kind):
    """Our step's `kl_std` is upstream's std_dev_t, and the KL on the two policies' step means is
    upstream's value (the log-ratio form 0.5 (log r)^2 we used is another quantity altogether)."""
    sched = FlowMatchSDE(FlowMatchEulerDiscreteScheduler(), 5, seq_len=16, kind=kind, noise_level=0.7)
    g = torch.Generator().manual_seed(4)
    x, v, v_ref = (torch.randn(4, 4, 3, 3, generator=g) for _ in range(3))
    index = torch.arange(4)
    out = sched.step(v, index, x, noise=torch.randn(4, 4, 3, 3, generator=g))
    ref = sched.step(v_ref, index, x, prev_sample=out.prev_sample)
    s, sp = sched.sigmas[index].view(-1, 1, 1, 1), sched.sigmas[index + 1].view(-1, 1, 1, 1)
    std_dev_t = _upstream_std_dev_t(s, sp, sched.sigmas[1], 0.7, kind)
    torch.testing.assert_close(out.kl_std, std_dev_t.expand_as(out.kl_std), rtol=1e-6, atol=0)
    theirs = _upstream_kl(out.mean, ref.mean, std_dev_t)
    torch.testing.assert_close(step_mean_kl(out.mean, ref.mean, out.kl_std), theirs, rtol=1e-6, atol=0)


def test_the_learner_uses_it_for_a_flow_editor(kontext_learner):
    """PPO with `train.kl_coef` on the tiny Kontext (LoRA): after an update moves the adapter, the
    step loss's `kl` is Flow-GRPO's, computed from the policy's step means with and without LoRA."""
    policy, learner, r = kontext_learner("train.objective=ppo", "train.kl_coef=0.04", "train.batch_size=8")
    learner.train(r, torch.Generator().manual_seed(0))
    j = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    with torch.no_grad():
        _, info = learner._step_loss(r, j, None)
        out = policy.step_output(r, j)
        policy.denoiser.disable_adapters()
        ref = policy.step_output(r, j)
        policy.denoiser.enable_adapters()
    expected = _upstream_kl(out.mean, ref.mean, out.kl_std)
    assert expected > 0
    torch.testing.assert_close(info["kl"], expected, rtol=1e-5, atol=0)
