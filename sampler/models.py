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


def hub_problem(model_id: str, revision: str | None = None, timeout_s: float = 5.0) -> str | None:
    """Why a model the run names cannot be loaded, asked once before any download (None: go ahead).

    A local folder, or a hub id whose `model_index.json` / `config.json` is in the local hub cache,
    is fine. Otherwise: a name whose first part is a folder here is a mistyped path (said before any
    hub lookup); `HF_HUB_OFFLINE` set means no lookup at all; else the hub is asked once, with
    `timeout_s` and no retries (`huggingface_hub.model_info`), instead of the downloads' five retries
    per file. Returns one line: the model, the reason, and how to point at a local folder.
    """
    import os

    path = Path(model_id).expanduser()
    if path.is_dir():
        return None
    local_hint = (
        f"download it where the hub is reachable (`hf download {model_id} --local-dir DIR`) and set "
        "model.pretrained to DIR"
    )
    parts = Path(model_id).parts
    if looks_local(model_id) or (len(parts) == 2 and Path(parts[0]).is_dir()):
        return f"model folder not found: {model_id} (from {Path.cwd()}); a path is not looked up on the hub"
    try:
        from huggingface_hub import constants, model_info, try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
        return None
    for name in ("model_index.json", "config.json"):
        if isinstance(try_to_load_from_cache(model_id, name, revision=revision), str):
            return None
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline or constants.HF_HUB_OFFLINE:
        return f"model {model_id!r}: not in the local hub cache and HF_HUB_OFFLINE is set; {local_hint}"
    try:
        model_info(model_id, revision=revision, timeout=timeout_s)
    except Exception as err:  # noqa: BLE001 - any failure is reported in one line
        reason = (str(err).splitlines() or [""])[0][:160]
        return f"model {model_id!r}: the hub cannot serve it ({type(err).__name__}: {reason}); {local_hint}"
    return None


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
