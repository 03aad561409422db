"""The run's editor policy built on the meta device by the real construction path, and one train step
and one sampling step on meta tensors at the run's batch sizes and resolution.

The pipeline's components come from their architecture configs (`trainer.plan.arch`); the policy,
its LoRA and its checks are `trainer.engine`'s (`wrap_policy`, `wrap_flow_policy`), and the step is
the policy's own `step_log_prob` (the PPO / ranking / SPO learners' model call) or `forward_x0`
(DiffusionNFT's), so the latent packing, the RoPE ids and the conditioning latents run as in a real
run. Only the frozen encoders' outputs are made up (zeros of their shapes): the text encoders and the
VAE encoder run at sampling time, outside the trained step, and tokenizers are not needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from sampler.editors import load_editor
from sampler.models import Components
from sampler.rollout import Rollout
from trainer.config import Config
from trainer.engine.flow_policy import DTYPES, wrap_flow_policy
from trainer.engine.policy import wrap_policy
from trainer.plan.arch import build_pipeline_components
from trainer.plan.measure import GpuAttention, LiveBytes, SavedBytes

META = torch.device("meta")


def meta_policy(config: Config, family: str, folder, device: torch.device = META):
    """The run's policy on meta: components from `folder`'s configs, LoRA per config (its targets
    checked). With another `device` the weights are made there, random (N(0, 0.02)): for timings
    and measured peaks on a GPU, where speed does not depend on the weights."""
    editor = load_editor(family)
    lora = config.model.use_lora
    dtype = DTYPES[config.run.mixed_precision] if (lora and editor.FLOW_MATCHING) else torch.float32
    pipe_class, parts = build_pipeline_components(folder, dtype)
    if device.type != "meta":
        for part in parts.values():
            if isinstance(part, torch.nn.Module):
                _materialize(part, device)
    if not editor.FLOW_MATCHING:
        from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

        kind = {"ddim": DDIMScheduler, "euler_ancestral": EulerAncestralDiscreteScheduler}[
            config.model.scheduler
        ]
        sched = kind.from_config(parts["scheduler"].config)  # as `load_components` picks the class
        components = Components(parts["unet"], parts["vae"], parts["text_encoder"], None, sched)
        policy = wrap_policy(config, editor, components, device)
        te = parts["text_encoder"].config
        policy._null = torch.zeros(1, te.max_position_embeddings, te.hidden_size, device=device)
        return policy
    import diffusers

    absent = {k: None for k in ("tokenizer", "tokenizer_2", "processor") if k in _init_names(pipe_class)}
    pipe = getattr(diffusers, pipe_class)(**parts, **absent)
    if hasattr(pipe, "tokenizer_2"):  # KontextPolicy reads the T5 tokenizer's length only
        object.__setattr__(pipe, "tokenizer_2", SimpleNamespace(model_max_length=512))
    return wrap_flow_policy(config, editor, pipe, device)


def _materialize(module: torch.nn.Module, device: torch.device) -> None:
    """Meta parameters and buffers made real on `device`: weights N(0, 0.02), norms' weights 1."""
    module.to_empty(device=device)
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if not t.is_floating_point():
                t.zero_()
            elif t.ndim == 1 and "norm" in name:
                t.fill_(1.0)
            else:
                t.normal_(0, 0.02)


def _init_names(pipe_class: str) -> set[str]:
    import inspect

    import diffusers

    return set(inspect.signature(getattr(diffusers, pipe_class).__init__).parameters)


def _cond(policy, family: str, config: Config, b: int) -> dict[str, torch.Tensor]:
    """Conditioning of B items as the encoders would give it (zeros of the right shapes and dtypes)."""
    m = config.model
    c = policy.c
    dev = policy.device
    _, h, w = policy.latent_shape(m.resolution)
    if family == "instruct_pix2pix":
        te = c.text_encoder.config
        return {
            "text_embeds": torch.zeros(b, te.max_position_embeddings, te.hidden_size, device=dev),
            "image_latents": torch.zeros(b, 4, h, w, device=dev),
        }
    if family == "flux_kontext":
        return {
            "text_embeds": torch.zeros(
                b, policy.max_text_length, c.text_encoder_2.config.d_model, device=dev
            ),
            "pooled_embeds": torch.zeros(b, c.text_encoder.config.hidden_size, device=dev),
            "image_latents": torch.zeros(b, c.vae.config.latent_channels, h, w, device=dev),
        }
    if family == "qwen_image_edit":
        from sampler.editors.qwen_edit import condition_size

        hc, wc = condition_size(policy.condition_area, m.resolution, m.resolution)
        k, length = (2 if policy.cfg else 1), m.text_length
        dim = c.text_encoder.config.text_config.hidden_size
        f = policy.vae_factor
        return {
            "text_embeds": torch.zeros(b, k, length, dim, device=dev),
            "text_mask": torch.ones(b, k, length),  # on the CPU: the policy reads its lengths
            "image_latents": torch.zeros(b, c.vae.config.z_dim, hc // f, wc // f, device=dev),
        }
    raise ValueError(f"no dry-run conditioning for editor family {family!r}")


def fake_rollout(policy, family: str, config: Config, b: int) -> Rollout:
    """B recorded trajectories of meta tensors at the run's resolution and step count."""
    t = config.sample.num_steps
    dev = policy.device
    ch, h, w = policy.latent_shape(config.model.resolution)
    res = config.model.resolution
    return Rollout(
        latents=torch.zeros(b, t + 1, ch, h, w, device=dev),
        step_index=torch.zeros(b, t, dtype=torch.long, device=dev),
        log_probs=torch.zeros(b, t, device=dev),
        stochastic=torch.ones(t, dtype=torch.bool),
        images=torch.zeros(b, 3, res, res, device=dev),
        sources=torch.zeros(b, 3, res, res, device=dev),
        group=torch.zeros(b, dtype=torch.long),
        instructions=[""] * b,
        **_cond(policy, family, config, b),
    )


@dataclass
class StepBytes:
    """What one step holds beyond the weights, in bytes: `saved` activations, `peak` of everything made."""

    saved: int
    peak: int


def _checkpointing(denoiser, on: bool) -> None:
    if on:
        denoiser.enable_gradient_checkpointing()
    else:
        denoiser.disable_gradient_checkpointing()


def train_step(policy, family: str, config: Config, checkpointing: bool = False) -> StepBytes:
    """One forward and backward of the learner's model call at `train.batch_size` (meta or real tensors)."""
    b = config.train.batch_size
    batch = fake_rollout(policy, family, config, b)
    den = policy.denoiser
    was = den.is_gradient_checkpointing  # the run's own setting (`train.denoiser_checkpointing`)
    _checkpointing(den, checkpointing)
    den.train()
    try:
        with GpuAttention(), LiveBytes() as live:
            with SavedBytes(*_modules(policy)) as saved:
                if config.train.objective == "nft":
                    index = torch.zeros(b, dtype=torch.long, device=batch.latents.device)
                    out = policy.forward_x0(batch, index, torch.zeros_like(batch.latents[:, -1]))
                else:
                    out = policy.step_log_prob(batch, 0)
            out.float().sum().backward()
    finally:
        _checkpointing(den, was)
    return StepBytes(saved.total, live.peak)


def sample_step(policy, family: str, config: Config) -> int:
    """Peak bytes of one sampling model call (no grad) for a rollout batch of batch_size x nb_gen edits."""
    n = config.sample.batch_size * config.sample.nb_gen
    batch = fake_rollout(policy, family, config, n)
    index = torch.zeros(n, dtype=torch.long, device=batch.latents.device)
    with torch.no_grad(), GpuAttention(), LiveBytes() as live:
        if family == "instruct_pix2pix":
            policy.guided_noise(batch.latents[:, 0], index, batch.text_embeds, batch.image_latents)
        else:
            policy.velocity(batch.latents[:, 0], index, policy._cond(batch))
    return live.peak + batch.latents.numel() * 4  # plus the trajectory kept (fp32)


def _modules(policy) -> list[torch.nn.Module]:
    c = policy.c
    names = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2")
    return [getattr(c, n) for n in names if isinstance(getattr(c, n, None), torch.nn.Module)]


def policy_modules(policy) -> dict[str, torch.nn.Module]:
    """Name -> every model of the policy (denoiser, VAE, text encoders)."""
    c = policy.c
    names = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2")
    return {n: getattr(c, n) for n in names if isinstance(getattr(c, n, None), torch.nn.Module)}
