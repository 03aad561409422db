"""FLUX.1 Kontext behind the editor contract: diffusers equality at noise 0, the SDE / CPS steps
against Flow-GRPO's formulas and the Gaussian closed form, and recomputed log-probs (ratio 1)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sampler.editors import editor_family
from sampler.editors.flow_sde import FlowMatchSDE
from sampler.editors.kontext import KontextPolicy, load_kontext
from sampler.editors.tiny_kontext import save_tiny_kontext

RES = 16  # 16 px: 8 x 8 latents, 16 image tokens


@pytest.fixture(scope="module")
def kontext_pipe(tmp_path_factory):
    """The tiny Kontext saved with `save_pretrained` and loaded back with `from_pretrained`."""
    path = save_tiny_kontext(tmp_path_factory.mktemp("kontext"), seed=0, vae_warmup_steps=0)
    return load_kontext(str(path))


def _inputs(m: int = 2):
    sources = torch.rand(m, 3, RES, RES, generator=torch.Generator().manual_seed(1))
    return sources, ["make it red", "remove the square"][:m]


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_noise_level_zero_equals_the_diffusers_pipeline(kontext_pipe, kind):
    """At noise level 0 both samplers are the Euler ODE: the edits equal FluxKontextPipeline's for the
    same model, generator, steps and guidance (to 1e-4), and carry no log-probability."""
    sources, instructions = _inputs()
    policy = KontextPolicy(kontext_pipe, num_steps=3, noise_level=0.0, sde_kind=kind, resolution=RES)
    ours = policy.rollout(sources, instructions, generator=torch.Generator().manual_seed(0))
    theirs = kontext_pipe(
        image=sources, prompt=instructions, height=RES, width=RES, max_area=RES * RES,
        _auto_resize=False, num_inference_steps=3, guidance_scale=policy.guidance_scale,
        max_sequence_length=policy.max_text_length, output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert ours.images.shape == theirs.shape == (2, 3, RES, RES)
    assert (ours.images - theirs).abs().max() < 1e-4
    assert not ours.stochastic.any() and (ours.log_probs == 0).all()


def _flow_grpo_step(v, x, sigma, sigma_prev, sigma_max, a, kind, z):
    """Flow-GRPO's `sde_step_with_logprob` lines (yifan123/flow_grpo,
    flow_grpo/diffusers_patch/sd3_sde_with_logprob.py at 54809b5, lines 45-80): mean and noise scale."""
    dt = sigma_prev - sigma
    if kind == "sde":
        std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * a
        mean = (
            x * (1 + std_dev_t**2 / (2 * sigma) * dt)
            + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
        )
        return mean, std_dev_t * torch.sqrt(-1 * dt)
    std_dev_t = sigma_prev * math.sin(a * math.pi / 2)
    x0, x1 = x - sigma * v, x + v * (1 - sigma)
    return x0 * (1 - sigma_prev) + x1 * torch.sqrt(sigma_prev**2 - std_dev_t**2), std_dev_t


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_step_matches_flow_grpo_and_the_gaussian_closed_form(kontext_pipe, kind):
    """On fixed numbers, each item at its own step: the mean and std are Flow-GRPO's, and the log-prob
    is the Gaussian log-density of the sample taken, averaged over dimensions (CPS's option
    `cps_log_prob="gaussian"`; its default, Flow-GRPO's, is tested in test_cps_logprob.py)."""
    sched = FlowMatchSDE(
        kontext_pipe.scheduler, num_steps=4, seq_len=16, kind=kind, noise_level=0.7, cps_log_prob="gaussian"
    )
    assert float(sched.sigmas[0]) == 1.0 and float(sched.sigmas[-1]) == 0.0
    g = torch.Generator().manual_seed(3)
    x, v, z = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    index = torch.tensor([0, 1, 2])
    out = sched.step(v, index, x, noise=z)
    s, sp = sched.sigmas[index].view(-1, 1, 1, 1), sched.sigmas[index + 1].view(-1, 1, 1, 1)
    mean, std = _flow_grpo_step(v, x, s, sp, sched.sigmas[1], 0.7, kind, z)
    torch.testing.assert_close(out.mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.std, std.expand_as(out.std), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.prev_sample, mean + std * z, rtol=1e-5, atol=1e-6)
    closed = torch.distributions.Normal(mean, std).log_prob(out.prev_sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, closed, rtol=1e-5, atol=1e-5)
    # CPS: the last step lands on sigma = 0 without noise; the SDE's last step still draws noise.
    assert bool(sched.step_is_stochastic()[-1]) == (kind == "sde")


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_recomputed_log_probs_equal_the_recorded_ones(kontext_pipe, kind):
    """Every recorded step of 4 edits (2 inputs x 2), scored again under the same weights: ratio 1."""
    sources, instructions = _inputs()
    policy = KontextPolicy(kontext_pipe, num_steps=3, noise_level=0.7, sde_kind=kind, resolution=RES)
    r = policy.rollout(sources, instructions, nb_gen=2, generator=torch.Generator().manual_seed(0))
    assert r.latents.shape == (4, 4, 4, 8, 8) and r.pooled_embeds.shape == (4, 32)
    assert r.log_probs[:, r.stochastic].abs().min() > 0
    mixed = torch.tensor([2, 0, 1, 2])  # each item at its own step
    again = torch.stack([policy.step_log_prob(r, j) for j in range(3)], dim=1)
    torch.testing.assert_close(again, r.log_probs, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        policy.step_log_prob(r, mixed), r.log_probs[torch.arange(4), mixed], atol=1e-5, rtol=0
    )


def test_the_model_folder_names_its_family(kontext_pipe, tmp_path):
    """`model.editor: auto` reads model_index.json's `_class_name`; an unknown pipeline is refused."""
    folder = tmp_path / "m"
    kontext_pipe.save_pretrained(folder)
    assert editor_family(str(folder)) == "flux_kontext"
    assert editor_family("tiny") == "instruct_pix2pix" and editor_family("tiny-kontext") == "flux_kontext"
    assert editor_family(str(folder), "instruct_pix2pix") == "instruct_pix2pix"
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "SomethingElse"}))
    with pytest.raises(ValueError, match="unknown pipeline 'SomethingElse'"):
        editor_family(str(folder))
