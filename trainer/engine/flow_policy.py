"""Building a flow-matching edit policy (FLUX.1 Kontext) from config, with LoRA on its transformer."""

from __future__ import annotations

from pathlib import Path

import torch

from sampler.editors.kontext import KontextPolicy, load_kontext
from sampler.editors.tiny_kontext import save_tiny_kontext
from trainer.config import Config
from trainer.errors import UserError

# FLUX transformer attention projections: the image stream's q/k/v/out and the text stream's
# (`add_*_proj`, `to_add_out`), as Flow-GRPO's FLUX LoRA targets them.
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
DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_flow_policy(config: Config, family: str, device: torch.device) -> KontextPolicy:
    """Load a flow-matching editor of `family` and wrap it for SDE sampling with log-probs."""
    m, s = config.model, config.sample
    if family != "flux_kontext":
        raise UserError(f"model.editor={family}: not supported yet (instruct_pix2pix, flux_kontext)")
    if m.exemplar_conditioning:
        raise UserError("model.exemplar_conditioning is InstructPix2Pix only (model.editor=flux_kontext)")
    path = m.pretrained
    if path == "tiny-kontext":
        path = str(
            save_tiny_kontext(Path(m.tiny_dir) / f"kontext-seed{config.run.seed}", seed=config.run.seed)
        )
    # The frozen parts in the run's precision with LoRA (peft keeps the adapters in float32); full
    # fine-tuning keeps float32 weights.
    dtype = DTYPES[config.run.mixed_precision] if m.use_lora else torch.float32
    try:
        pipe = load_kontext(path, m.revision, dtype)
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
                target_modules=FLUX_LORA_TARGETS,
            )
        )
    return KontextPolicy(
        pipe,
        num_steps=s.num_steps,
        noise_level=s.noise_level,
        sde_kind=s.sde_kind,
        guidance_scale=s.guidance_scale,
        resolution=m.resolution,
        device=device,
    )
