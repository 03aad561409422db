"""Sampling with gradients through the denoising chain and the VAE decoder (AlignProp).

AlignProp (Prabhudesai et al. 2023, arXiv 2310.03739; `mihirp1998/AlignProp`, `sd_pipeline.py:
pipeline_step_with_grad`) backpropagates a differentiable reward of the decoded image into the
UNet through the sampling chain, truncated to the last K steps: there, the UNet's prediction for
steps before the cut is detached. Here the steps before the cut run under `torch.no_grad()` (no
graph at all, so memory grows with K alone), the last K steps run with a graph (each UNet call
optionally under gradient checkpointing), and the decoder keeps its graph.

The noise is drawn in the order `EditPolicy.rollout` draws it (x_T, then one draw per step), so a
shard planned by `trainer.engine.shards.plan_epoch` samples the same edits either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

from sampler.policy import EditPolicy, randn


@dataclass
class GradSample:
    """Edits sampled with a graph through the last `grad_steps` steps.

    Attributes:
        images: (N, 3, H, W) float in [0, 1], differentiable w.r.t. the trained weights.
        x_T: (N, C, h, w) the initial latents (detached).
        x_0: (N, C, h, w) the final latents (detached).
        grad_steps: steps that ran with a graph (K).
        image_latents, text_embeds: (N, C, h, w), (N, L, D) conditioning, detached.
    """

    images: torch.Tensor
    x_T: torch.Tensor
    x_0: torch.Tensor
    grad_steps: int
    image_latents: torch.Tensor
    text_embeds: torch.Tensor


def decode_with_grad(policy: EditPolicy, latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) latents -> (N, 3, H, W) images in [0, 1], keeping the graph (as `EditPolicy.decode`)."""
    vae = policy.c.vae
    images = vae.decode(latents.to(vae.dtype) / policy.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1).float()


def sample_with_grad(
    policy: EditPolicy,
    sources: torch.Tensor,
    instructions: list[str],
    grad_steps: int,
    nb_gen: int = 1,
    generator: torch.Generator | None = None,
    shared_noise: bool = False,
    exemplars: torch.Tensor | None = None,
    gradient_checkpointing: bool = True,
) -> GradSample:
    """Sample nb_gen edits of each of M inputs, with a graph through the last `grad_steps` steps.

    Args:
        sources: (M, 3, H, W) in [0, 1].
        instructions: M instructions.
        grad_steps: K in [1, T]: steps T-K .. T-1 keep a graph, the earlier ones run without one.
        nb_gen, generator, shared_noise, exemplars: as `EditPolicy.rollout`.
        gradient_checkpointing: recompute each UNet call in the backward pass instead of storing
            its activations.
    """
    steps = policy.sched.num_steps
    if not 1 <= grad_steps <= steps:
        raise ValueError(f"grad_steps must be in [1, {steps}], got {grad_steps}")
    m = sources.shape[0]
    n = m * nb_gen
    rep = lambda x: x.repeat_interleave(nb_gen, dim=0)  # noqa: E731
    text = rep(policy.encode_text(instructions))
    image_latents = rep(policy.encode_images(sources))
    ex_latents = rep(policy.encode_images(exemplars)) if exemplars is not None else None
    shape = (n, *image_latents.shape[1:])
    base = randn((m if shared_noise else n, *shape[1:]), generator)
    x = ((rep(base) if shared_noise else base) * policy.sched.init_noise_sigma).to(
        policy.device, torch.float32
    )
    x_T = x
    for i in range(steps):
        index = torch.full((n,), i, dtype=torch.long, device=policy.device)
        noise = randn(shape, generator).to(policy.device)
        if i < steps - grad_steps:
            with torch.no_grad():
                eps = policy.guided_noise(x, index, text, image_latents, ex_latents)
        elif gradient_checkpointing:
            eps = checkpoint(
                policy.guided_noise, x, index, text, image_latents, ex_latents, use_reentrant=False
            )
        else:
            eps = policy.guided_noise(x, index, text, image_latents, ex_latents)
        x = policy.sched.step(eps, index, x, noise=noise).prev_sample
    images = decode_with_grad(policy, x)
    return GradSample(images, x_T.detach(), x.detach(), grad_steps, image_latents, text)
