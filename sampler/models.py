"""Loading the base InstructPix2Pix: a hub id, a local folder, or the seeded tiny model.

Every path goes through diffusers/transformers `from_pretrained`, so the tiny model exercises the
same code as `timbrooks/instruct-pix2pix` on a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Components:
    """The frozen and trainable parts of an InstructPix2Pix model."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # a diffusers scheduler (its config defines the noise schedule)


def resolve_pretrained(pretrained: str, tiny_dir: str | Path = "runs/.tiny-ip2p", seed: int = 0) -> str:
    """Map "tiny" to a locally built tiny model folder; pass hub ids and folders through."""
    if pretrained == "tiny":
        from sampler.tiny import save_tiny_model

        return str(save_tiny_model(Path(tiny_dir) / f"seed{seed}", seed=seed))
    return pretrained


def looks_local(pretrained: str) -> bool:
    """True for what can only be a folder (absolute, `./`, `../`, `~`, or more than `org/name`): such a
    name is never looked up on a model hub."""
    return pretrained.startswith(("/", "./", "../", "~")) or len(Path(pretrained).parts) > 2


def load_components(pretrained: str, revision: str | None = None, scheduler: str = "ddim") -> Components:
    """Load unet, vae, text encoder, tokenizer and a `scheduler`-kind scheduler with `from_pretrained`.

    Args:
        pretrained: hub id or local folder in the diffusers pipeline layout.
        revision: hub revision (ignored for local folders).
        scheduler: "ddim" or "euler_ancestral"; built from the model's own scheduler config.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, EulerAncestralDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    local = Path(pretrained).expanduser().is_dir()
    if not local and looks_local(pretrained):
        raise FileNotFoundError(f"model folder not found: {pretrained}")
    pretrained = str(Path(pretrained).expanduser()) if local else pretrained
    kwargs = {} if local else {"revision": revision}
    unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", **kwargs)
    vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", **kwargs)
    text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", **kwargs)
    tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kwargs)
    scheduler_cls = {"ddim": DDIMScheduler, "euler_ancestral": EulerAncestralDiscreteScheduler}[scheduler]
    sched = scheduler_cls.from_pretrained(pretrained, subfolder="scheduler", **kwargs)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
    return Components(unet, vae, text_encoder, tokenizer, sched)
