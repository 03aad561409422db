"""Building a flow-matching edit policy (FLUX.1 Kontext, Qwen-Image-Edit) from config, with LoRA on
its transformer."""

from __future__ import annotations

from pathlib import Path

import torch

from sampler.editors.flow_base import FlowEditPolicy
from trainer.config import Config
from trainer.errors import UserError

# The transformers' attention projections: the image stream's q/k/v/out and the text stream's
# (`add_*_proj`, `to_add_out`), as Flow-GRPO's FLUX LoRA targets them; Qwen-Image's MMDiT blocks
# have the same names (diffusers' `QwenImageTransformer2DModel._tp_plan`, DiffSynth's Qwen-Image LoRA).
FLUX_LORA_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
]
QWEN_LORA_TARGETS = FLUX_LORA_TARGETS
FAMILIES = ("flux_kontext", "qwen_image_edit")
DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _model_path(config: Config, family: str) -> str:
    """The model folder or hub id; the tiny models are built (once) under model.tiny_dir."""
    m, seed = config.model, config.run.seed
    if m.pretrained == "tiny-kontext":
        from sampler.editors.tiny_kontext import save_tiny_kontext

        return str(save_tiny_kontext(Path(m.tiny_dir) / f"kontext-seed{seed}", seed=seed))
    if m.pretrained == "tiny-qwen-edit":
        from sampler.editors.tiny_qwen_edit import save_tiny_qwen_edit

        return str(save_tiny_qwen_edit(Path(m.tiny_dir) / f"qwen-edit-seed{seed}", seed=seed))
    return m.pretrained


def build_flow_policy(config: Config, family: str, device: torch.device) -> FlowEditPolicy:
    """Load a flow-matching editor of `family` and wrap it for SDE sampling with log-probs."""
    m, s = config.model, config.sample
    if family not in FAMILIES:
        raise UserError(f"model.editor={family}: not supported (instruct_pix2pix, {', '.join(FAMILIES)})")
    if m.exemplar_conditioning:
        raise UserError(f"model.exemplar_conditioning is InstructPix2Pix only (model.editor={family})")
    if family == "flux_kontext":
        from sampler.editors.kontext import load_kontext as load
    else:
        from sampler.editors.qwen_edit import load_qwen_edit as load
    # The frozen parts in the run's precision with LoRA (peft keeps the adapters in float32); full
    # fine-tuning keeps float32 weights.
    dtype = DTYPES[config.run.mixed_precision] if m.use_lora else torch.float32
    try:
        pipe = load(_model_path(config, family), m.revision, dtype)
    except (OSError, ValueError) as err:
        raise UserError(
            f"model.pretrained: cannot load {m.pretrained!r}: {str(err).splitlines()[0]}"
        ) from err
    factor = int(pipe.vae_scale_factor) * 2
    if m.resolution % factor:
        raise UserError(f"model.resolution must be a multiple of {factor} for this model, got {m.resolution}")
    if m.use_lora:
        from peft import LoraConfig

        torch.manual_seed(config.run.seed)
        pipe.transformer.add_adapter(
            LoraConfig(
                r=m.lora_rank,
                lora_alpha=m.lora_alpha,
                init_lora_weights="gaussian",
                target_modules=FLUX_LORA_TARGETS if family == "flux_kontext" else QWEN_LORA_TARGETS,
            )
        )
    common = dict(
        num_steps=s.num_steps,
        noise_level=s.noise_level,
        sde_kind=s.sde_kind,
        resolution=m.resolution,
        device=device,
    )
    if family == "flux_kontext":
        from sampler.editors.kontext import KontextPolicy

        return KontextPolicy(pipe, guidance_scale=s.guidance_scale, **common)
    from sampler.editors.qwen_edit import PIPELINE_CONDITION_AREA, QwenEditPolicy, condition_size

    area = m.condition_area or PIPELINE_CONDITION_AREA
    try:
        condition_size(area, m.resolution, m.resolution)
    except ValueError as err:
        raise UserError(f"model.condition_area: {err}") from err
    return QwenEditPolicy(
        pipe,
        true_cfg_scale=s.guidance_scale,
        negative_prompt=s.negative_prompt,
        condition_area=area,
        max_text_length=m.text_length,
        **common,
    )
