"""CPS's log-probability as Flow-GRPO defines it, on fixed numbers.

Upstream (`yifan123/flow_grpo`, `flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`, lines 71-86 at
commit 54809b5, sde_type "cps"): std = sigma_prev sin(a pi / 2), mean = x0_hat (1 - sigma_prev) +
x1_hat sqrt(sigma_prev^2 - std^2), and (lines 85-86) log_prob = -(prev_sample - mean)^2, averaged over
the non-batch dimensions: no 1 / (2 std^2) factor, no constants.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from sampler.editors.flow_sde import FlowMatchSDE
from trainer.config.sample import SampleConfig

A = 0.7


def _upstream_cps(v, x, sigma, sigma_prev, prev_sample):
    """Flow-GRPO's CPS step (lines 71-74 and 85-86, then the mean over non-batch dims, line 89)."""
    std_dev_t = sigma_prev * math.sin(A * math.pi / 2)
    x0_hat, x1_hat = x - sigma * v, x + v * (1 - sigma)
    mean = x0_hat * (1 - sigma_prev) + x1_hat * torch.sqrt(sigma_prev**2 - std_dev_t**2)
    log_prob = -((prev_sample.detach() - mean) ** 2)
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim))), mean, std_dev_t


def _fixed(kind="cps", cps_log_prob="flow_grpo", steps=6):
    sched = FlowMatchSDE(
        FlowMatchEulerDiscreteScheduler(),
        steps,
        seq_len=16,
        kind=kind,
        noise_level=A,
        cps_log_prob=cps_log_prob,
    )
    g = torch.Generator().manual_seed(7)
    x, v, z = (torch.randn(steps - 1, 4, 3, 5, generator=g) for _ in range(3))
    index = torch.arange(steps - 1)  # every stochastic step, one per item
    return sched, x, v, z, index


def test_cps_log_prob_is_flow_grpos_by_default():
    """Default: our CPS log-prob of the sample drawn = upstream's -mean((x - mean)^2), step by step."""
    assert SampleConfig().cps_log_prob == "flow_grpo"
    sched, x, v, z, index = _fixed()
    out = sched.step(v, index, x, noise=z)
    s, sp = sched.sigmas[index].view(-1, 1, 1, 1), sched.sigmas[index + 1].view(-1, 1, 1, 1)
    theirs, mean, std = _upstream_cps(v, x, s, sp, out.prev_sample)
    torch.testing.assert_close(out.mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.log_prob, theirs, rtol=1e-5, atol=1e-7)
    # A recorded step rescored: the same value.
    again = sched.step(v, index, x, prev_sample=out.prev_sample)
    torch.testing.assert_close(again.log_prob, theirs, rtol=1e-5, atol=1e-7)
    # The KL's std is the step's (upstream returns std_dev_t = sigma_prev sin(a pi / 2)).
    torch.testing.assert_close(out.kl_std, std.expand_as(out.kl_std), rtol=1e-6, atol=0)


def test_the_exact_density_is_an_option_and_differs_by_a_step_dependent_factor():
    """`cps_log_prob="gaussian"`: log N(x; mean, std^2) averaged; its log-ratio is upstream's times
    1 / (2 std^2), a factor that grows as the noise falls (so not "only the scale")."""
    sched, x, v, z, index = _fixed(cps_log_prob="gaussian")
    out = sched.step(v, index, x, noise=z)
    closed = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, closed, rtol=1e-5, atol=1e-5)
    factor = 1 / (2 * out.std.view(-1) ** 2)
    assert factor[-1] / factor[0] > 10  # late steps weigh more than 10x the first


def test_sde_kind_keeps_the_gaussian_density_whatever_the_option():
    """The SDE's log-prob is upstream's Gaussian (lines 61-65) with either setting."""
    a, b = (_fixed(kind="sde", cps_log_prob=c) for c in ("flow_grpo", "gaussian"))
    out_a = a[0].step(a[2], a[4], a[1], noise=a[3])
    out_b = b[0].step(b[2], b[4], b[1], noise=b[3])
    torch.testing.assert_close(out_a.log_prob, out_b.log_prob, rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown CPS log-prob"):
        _fixed(cps_log_prob="exact")
