"""Edit a folder of images with a trained run or checkpoint, or a base model (`spie generate`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.config import load_config
from trainer.data.inputs import IMAGE_SUFFIXES, load_image
from trainer.engine.models import is_run_or_checkpoint, load_policy, model_spec
from trainer.errors import UserError
from trainer.run.checkpoint import find_checkpoint

RECORDED = "sft_config.yaml"  # the settings a base model was trained at, saved beside it by `spie sft`
SAMPLED = ("num_steps", "eta", "guidance_scale", "image_guidance_scale", "exemplar_guidance_scale")


def _recorded(path: Path) -> list[str]:
    """The sampling settings a base model was trained at, as overrides (`model.resolution`,
    `model.scheduler` and the `sample` fields the model's sampling depends on)."""
    import json

    import yaml

    recorded = yaml.safe_load(path.read_text()) or {}
    keep = {"model": ("resolution", "scheduler"), "sample": SAMPLED}
    return [
        f"{section}.{key}={json.dumps(recorded[section][key])}"
        for section, keys in keep.items()
        for key in keys
        if key in (recorded.get(section) or {})
    ]


def _sizes(files: list[Path], side: int) -> str:
    """A line for the images not already side x side: how many, their sizes, and whether the aspect
    ratio changes ("" when none is resized)."""
    sizes = {}
    for f in files:
        with Image.open(f) as im:
            sizes[f] = im.size  # (W, H)
    changed = [wh for wh in sizes.values() if wh != (side, side)]
    if not changed:
        return ""
    shown = ", ".join(f"{w} x {h}" for w, h in sorted(set(changed))[:3])
    aspect = " (the aspect ratio changes)" if any(w != h for w, h in changed) else ""
    return (
        f"[spie] {len(changed)} of {len(files)} images resized from {shown} to {side} x {side} px{aspect}: "
        "the model's resolution (--set model.resolution=N to change)"
    )


def generate(
    checkpoint: str | Path,
    images: str | Path,
    instruction: str,
    out: str | Path,
    seed: int = 0,
    overrides: list[str] | tuple[str, ...] = (),
    batch_size: int = 4,
    progress: bool = False,
    say=print,
) -> list[Path]:
    """Edit every image in `images` with `instruction`; writes PNGs named after the inputs into `out`.

    `checkpoint` is a run folder, a checkpoint folder, or a base model (`tiny`, a diffusers folder,
    a hub id) used as is; the model is loaded by the same checked loader as `spie evaluate`'s. A base
    model folder with the settings it was trained at (`sft_config.yaml`) samples at those; `say`
    reports that and any image resized (and whether its aspect ratio changes).
    """
    if is_run_or_checkpoint(Path(checkpoint)):
        config = load_config(find_checkpoint(checkpoint) / "config.yaml", overrides)
    elif (Path(checkpoint) / RECORDED).is_file():
        # A base model saved with the settings it was trained at (`spie sft` writes them): its
        # resolution, steps and guidance, not the defaults.
        config = load_config(None, [*_recorded(Path(checkpoint) / RECORDED), *overrides])
        say(
            f"[spie] {checkpoint}: its recorded settings ({RECORDED}): {config.model.resolution} px, "
            f"{config.sample.num_steps} steps"
        )
    else:
        config = load_config(None, overrides)
    spec = model_spec(str(checkpoint), "model", config)
    config = spec.config
    images = Path(images)
    if not images.is_dir():
        raise UserError(f"--images: folder not found: {images}")
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"--images: no images in {images}")
    if config.model.exemplar_conditioning:
        raise UserError(
            "generate: checkpoints with exemplar conditioning need exemplar images (not supported here yet)"
        )
    side = config.model.resolution
    sources = torch.stack([load_image(f, side) for f in files])  # fails before any work
    resized = _sizes(files, side)
    if resized:
        say(resized)
    policy = load_policy(spec)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    written = []
    for start in range(0, len(files), batch_size):
        chunk = sources[start : start + batch_size]
        r = policy.rollout(chunk, [instruction] * len(chunk), generator=gen, progress=progress)
        for f, img in zip(files[start : start + batch_size], r.edited_uint8(), strict=True):
            path = out / (f.stem + ".png")
            Image.fromarray(np.ascontiguousarray(img)).save(path)
            written.append(path)
    return written
