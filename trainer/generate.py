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


def generate(
    checkpoint: str | Path,
    images: str | Path,
    instruction: str,
    out: str | Path,
    seed: int = 0,
    overrides: list[str] | tuple[str, ...] = (),
    batch_size: int = 4,
    progress: bool = False,
) -> list[Path]:
    """Edit every image in `images` with `instruction`; writes PNGs named after the inputs into `out`.

    `checkpoint` is a run folder, a checkpoint folder, or a base model (`tiny`, a diffusers folder,
    a hub id) used as is; the model is loaded by the same checked loader as `spie evaluate`'s.
    """
    if is_run_or_checkpoint(Path(checkpoint)):
        config = load_config(find_checkpoint(checkpoint) / "config.yaml", overrides)
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
    sources = torch.stack([load_image(f, config.model.resolution) for f in files])  # fails before any work
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
