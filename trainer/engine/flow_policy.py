"""Building a flow-matching edit policy (FLUX.1 Kontext, Qwen-Image-Edit, or a plugin's) from config,
with LoRA on its transformer. What differs between the families is the editor module's
(`sampler.editors`): its loader, its LoRA targets, its tiny model and its policy."""

from __future__ import annotations

from types import ModuleType

import torch

from sampler.editors.flow_base import FlowEditPolicy
from trainer.config import Config
from trainer.engine.lora import add_lora, lora_targets
from trainer.errors import UserError

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _model_path(config: Config, editor: ModuleType) -> str:
    """The model folder or hub id; the editor's tiny model is built (once) under model.tiny_dir."""
    m = config.model
    if m.pretrained == editor.TINY_NAME:
        return editor.tiny_model(m.tiny_dir, config.run.seed)
    return m.pretrained


def build_flow_policy(config: Config, editor: ModuleType, device: torch.device) -> FlowEditPolicy:
    """Load a flow-matching editor (`sampler.editors.load_editor`) and wrap it for SDE sampling
    with log-probs."""
    m = config.model
    if m.exemplar_conditioning:
        raise UserError(f"model.exemplar_conditioning is InstructPix2Pix only (model.editor={editor.FAMILY})")
    # The frozen parts in the run's precision with LoRA (peft keeps the adapters in float32); full
    # fine-tuning keeps float32 weights.
    dtype = DTYPES[config.run.mixed_precision] if m.use_lora else torch.float32
    try:
        pipe = editor.load(_model_path(config, editor), m.revision, dtype)
    except (OSError, ValueError) as err:
        raise UserError(
            f"model.pretrained: cannot load {m.pretrained!r}: {str(err).splitlines()[0]}"
        ) from err
    return wrap_flow_policy(config, editor, pipe, device)


def wrap_flow_policy(config: Config, editor: ModuleType, pipe, device: torch.device) -> FlowEditPolicy:
    """The policy of a loaded pipeline with LoRA per config (also what `spie train --dry-run` runs on a
    pipeline built on the meta device)."""
    m, s = config.model, config.sample
    factor = int(pipe.vae_scale_factor) * 2
    if m.resolution % factor:
        raise UserError(f"model.resolution must be a multiple of {factor} for this model, got {m.resolution}")
    if m.use_lora:
        add_lora(pipe.transformer, config, lora_targets(config, editor))
    if config.train.denoiser_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    common = dict(
        num_steps=s.num_steps,
        noise_level=s.noise_level,
        sde_kind=s.sde_kind,
        resolution=m.resolution,
        device=device,
    )
    try:
        policy = editor.make_policy(pipe, m, s, **common)
    except ValueError as err:
        raise UserError(str(err)) from err
    policy.cps_log_prob = s.cps_log_prob
    policy._init_caches()  # schedules are built with it
    return policy
