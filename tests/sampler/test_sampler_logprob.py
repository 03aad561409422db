"""The log-prob sampler against diffusers' InstructPix2Pix pipeline and the Gaussian closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sampler.models import load_components
from sampler.policy import EditPolicy
from sampler.scenes import shapes_batch


def _sources(n: int = 2) -> tuple[list[Image.Image], torch.Tensor]:
    arr = shapes_batch(7, n, 32)
    return [Image.fromarray(a) for a in arr], torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255


def _policy(path: str, kind: str, eta: float, steps: int = 5) -> EditPolicy:
    return EditPolicy(
        load_components(path, scheduler=kind),
        kind,
        num_steps=steps,
        eta=eta,
        guidance_scale=4.0,
        image_guidance_scale=1.5,
    )


@pytest.mark.parametrize("kind,eta", [("ddim", 0.0), ("ddim", 1.0), ("euler_ancestral", 1.0)])
def test_images_equal_diffusers_pipeline(tiny_model_dir, kind, eta):
    """Same model, seed and steps: our sampler's images equal the pipeline's (1e-4)."""
    from diffusers import (
        DDIMScheduler,
        EulerAncestralDiscreteScheduler,
        StableDiffusionInstructPix2PixPipeline,
    )

    pils, sources = _sources(2)
    prompts = ["make it red", "turn the square blue"]
    policy = _policy(tiny_model_dir, kind, eta)
    ours = policy.rollout(sources, prompts, generator=torch.Generator().manual_seed(3)).images

    sched_cls = DDIMScheduler if kind == "ddim" else EulerAncestralDiscreteScheduler
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.scheduler = sched_cls.from_pretrained(tiny_model_dir, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        prompts,
        image=pils,
        num_inference_steps=5,
        guidance_scale=4.0,
        image_guidance_scale=1.5,
        eta=eta,
        generator=torch.Generator().manual_seed(3),
        output_type="pt",
    ).images
    assert ours.shape == theirs.shape == (2, 3, 32, 32)
    assert torch.allclose(ours, theirs.float(), atol=1e-4), (ours - theirs).abs().max()


@pytest.mark.parametrize("kind", ["ddim", "euler_ancestral"])
def test_step_matches_gaussian_closed_form(tiny_model_dir, kind):
    """log_prob is the mean log-density of N(mean, std^2) at the sample; std/mean match diffusers' step."""
    policy = _policy(tiny_model_dir, kind, eta=1.0)
    sched = policy.sched
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 16, 16, generator=gen) * 3
    eps = torch.randn(3, 4, 16, 16, generator=gen)
    noise = torch.randn(3, 4, 16, 16, generator=gen)
    index = torch.tensor([0, 2, 3])
    out = sched.step(eps, index, x, noise=noise)
    expected = (
        torch.distributions.Normal(out.mean, out.std.expand_as(out.mean))
        .log_prob(out.prev_sample)
        .mean(dim=(1, 2, 3))
    )
    assert torch.allclose(out.log_prob, expected, atol=1e-5)
    # The same step through diffusers (its own noise argument) lands on the same sample.
    ref = sched.scheduler
    for b in range(3):
        t = sched.timesteps[index[b]]
        if kind == "ddim":
            prev = ref.step(
                eps[b : b + 1], t, x[b : b + 1], eta=1.0, variance_noise=noise[b : b + 1]
            ).prev_sample
            prev_t = t - ref.config.num_train_timesteps // ref.num_inference_steps
            std = (ref._get_variance(t, prev_t) ** 0.5).item()
        else:
            ref._step_index = None
            torch.manual_seed(0)
            prev_det = ref.step(
                eps[b : b + 1], t, x[b : b + 1], generator=torch.Generator().manual_seed(1)
            ).prev_sample
            s_from, s_to = ref.sigmas[index[b]], ref.sigmas[index[b] + 1]
            std = (s_to**2 * (s_from**2 - s_to**2) / s_from**2).sqrt().item()
            drawn = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
            prev = prev_det - drawn * std + noise[b : b + 1] * std
        assert out.std[b].item() == pytest.approx(std, rel=1e-5)
        assert torch.allclose(out.prev_sample[b : b + 1], prev, atol=1e-4)


@pytest.mark.parametrize("kind", ["ddim", "euler_ancestral"])
def test_recomputed_log_probs_equal_recorded(tiny_model_dir, kind):
    """Unchanged weights: recomputing any recorded step gives its recorded log-prob (PPO ratio = 1)."""
    policy = _policy(tiny_model_dir, kind, eta=1.0)
    _, sources = _sources(2)
    r = policy.rollout(
        sources, ["make it red", "make it blue"], nb_gen=2, generator=torch.Generator().manual_seed(1)
    )
    assert r.latents.shape == (4, 6, 4, 16, 16) and r.log_probs.shape == (4, 5)
    assert r.stochastic[:-1].all()
    with torch.no_grad():
        for j in range(5):
            lp = policy.step_log_prob(r, j)
            assert torch.allclose(lp, r.log_probs[:, j], atol=1e-5)
        # Mixed steps in one batch (as training does) give the same values.
        j = torch.tensor([0, 3, 1, 4])
        lp = policy.step_log_prob(r, j)
        assert torch.allclose(lp, r.log_probs[torch.arange(4), j], atol=1e-5)
        assert torch.allclose(torch.exp(lp - r.log_probs[torch.arange(4), j]), torch.ones(4), atol=1e-5)


def test_nb_gen_shared_and_independent_noise(tiny_model_dir):
    policy = _policy(tiny_model_dir, "ddim", eta=1.0, steps=2)
    _, sources = _sources(2)
    shared = policy.rollout(
        sources, ["a", "b"], nb_gen=3, generator=torch.Generator().manual_seed(0), shared_noise=True
    )
    indep = policy.rollout(sources, ["a", "b"], nb_gen=3, generator=torch.Generator().manual_seed(0))
    assert shared.group.tolist() == [0, 0, 0, 1, 1, 1]
    assert shared.instructions == ["a", "a", "a", "b", "b", "b"]
    x_t = shared.latents[:, 0]
    assert torch.equal(x_t[0], x_t[1]) and torch.equal(x_t[0], x_t[2]) and not torch.equal(x_t[0], x_t[3])
    y_t = indep.latents[:, 0]
    assert not torch.equal(y_t[0], y_t[1])
    # Shared start, independent steps: the edits still differ.
    assert not torch.allclose(shared.images[0], shared.images[1])


def test_exemplar_conditioning_starts_as_the_base_model(tiny_model_dir):
    """Zero-initialised extra conv_in channels: the 4-way guided eps equals the 3-way one."""
    from sampler.exemplar import ExemplarPreconv, expand_conv_in

    base = _policy(tiny_model_dir, "ddim", eta=1.0)
    comps = load_components(tiny_model_dir, scheduler="ddim")
    expand_conv_in(comps.unet, 4)
    assert comps.unet.conv_in.in_channels == 12 and comps.unet.config.in_channels == 12
    torch.manual_seed(0)
    ex = EditPolicy(
        comps,
        "ddim",
        num_steps=5,
        eta=1.0,
        guidance_scale=4.0,
        image_guidance_scale=1.5,
        exemplar=ExemplarPreconv(32, 32, 4),
    )
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    img = torch.randn(2, 4, 16, 16, generator=gen)
    exemplar = torch.randn(2, 4, 16, 16, generator=gen)
    text = base.encode_text(["make it red", "add a hat"])
    index = torch.tensor([0, 2])
    with torch.no_grad():
        a = base.guided_noise(x, index, text, img)
        b = ex.guided_noise(x, index, text, img, exemplar)
    assert torch.allclose(a, b, atol=1e-5)
    # The pre-conv module is live: a non-zero conv_in slice changes the prediction.
    with torch.no_grad():
        comps.unet.conv_in.weight[:, 8:] = 0.1
        c = ex.guided_noise(x, index, text, img, exemplar)
    assert not torch.allclose(a, c, atol=1e-4)
    assert np.isfinite(c.numpy()).all()
