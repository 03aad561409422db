"""The `model` section: the base editor, its family, LoRA and the image size."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class ModelConfig:
    # Base model: a hub id ("timbrooks/instruct-pix2pix"), a local folder saved with
    # `save_pretrained`, "tiny" to build a seeded tiny InstructPix2Pix in `tiny_dir`, or
    # "tiny-kontext" / "tiny-qwen-edit" for a seeded tiny FLUX.1 Kontext / Qwen-Image-Edit.
    pretrained: str = "tiny"
    # Editor family: "auto" (the model folder's model_index.json `_class_name`) or a family of the
    # editor registry (`sampler.editors`, or a `spie.editors` entry point): "instruct_pix2pix",
    # "flux_kontext" or "qwen_image_edit" (flow matching: sample.noise_level and sample.sde_kind apply).
    editor: str = "auto"
    # Hub revision of `pretrained` (ignored for local folders).
    revision: str = "main"
    # Where the tiny model is built and cached when `pretrained` is "tiny".
    tiny_dir: str = "runs/.tiny-ip2p"
    # Sampling scheduler with log-probs: "ddim" or "euler_ancestral" (SPIE's two).
    scheduler: Literal["ddim", "euler_ancestral"] = "ddim"
    # Train LoRA adapters on the UNet attention projections (True) or the whole UNet (False).
    use_lora: bool = True
    # LoRA rank.
    lora_rank: int = 8
    # LoRA alpha (scale = alpha / rank).
    lora_alpha: float = 8.0
    # Module names LoRA adapts (a name matches modules whose name equals it or ends with ".name");
    # empty: the editor family's attention projections (`LORA_TARGETS` of its `sampler.editors` module).
    lora_targets: list[str] = field(default_factory=list)
    # SPIE exemplar conditioning: 4 zero-initialised extra conv_in channels plus the
    # cross-attention pre-conv module. Needs exemplar images in the data.
    exemplar_conditioning: bool = False
    # Image side in pixels; inputs are resized to resolution x resolution.
    resolution: int = 256
    # Qwen-Image-Edit: pixels of the condition image the source is resized to before Qwen2.5-VL and
    # the VAE read it (0: the pipeline's 1024 * 1024; Flow-GRPO trains with 512 * 512).
    condition_area: int = 0
    # Qwen-Image-Edit: text embeddings (instruction with the condition image's vision tokens) are
    # padded to this many tokens so that batches concatenate; longer prompts are refused.
    text_length: int = 512
