"""Training inputs: (source image, instruction[, mask, exemplar]) for the sampler.

Sources:
- "shapes": seeded scenes of coloured rectangles and discs on a plain background (no files needed);
- "folder": every image in a folder, edited with the configured instructions (cycled);
- "jsonl": one JSON object per line, {"image": path, "instruction": str[, "mask": path,
  "exemplar": path]}, paths relative to the JSONL file.

Every image is loaded and checked up front, so a broken file stops the run before any work is done,
with one line naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from sampler.scenes import shapes_batch
from trainer.config import DataConfig
from trainer.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class Inputs:
    """M inputs. sources: (M, 3, R, R) float in [0, 1]; masks: (M, R, R) bool or None; exemplars likewise."""

    sources: torch.Tensor
    instructions: list[str]
    masks: torch.Tensor | None = None
    exemplars: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.sources.shape[0]

    def take(self, index: torch.Tensor) -> Inputs:
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return Inputs(
            self.sources[index],
            [self.instructions[i] for i in index.tolist()],
            pick(self.masks),
            pick(self.exemplars),
        )


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """Read an image file as (3, R, R) float in [0, 1]; a bad file raises `UserError` naming it."""
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            image = im.convert("RGB").resize((resolution, resolution), Image.BICUBIC)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise UserError(f"cannot read image {path}: {err}") from err
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255.0


def _load_mask(path: Path, resolution: int) -> torch.Tensor:
    return load_image(path, resolution).mean(0) > 0.5


def load_inputs(config: DataConfig, resolution: int, seed: int = 0) -> Inputs:
    """Load (or draw) every training input described by `config`."""
    if config.source == "shapes":
        scenes = shapes_batch(seed, config.num_items, resolution)
        sources = torch.from_numpy(scenes).permute(0, 3, 1, 2).float() / 255.0
        instructions = [config.instructions[i % len(config.instructions)] for i in range(config.num_items)]
        return Inputs(sources, instructions)
    path = Path(config.path)
    if config.source == "folder":
        if not path.is_dir():
            raise UserError(f"data.path: image folder not found: {path}")
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UserError(f"data.path: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}")
        sources = torch.stack([load_image(f, resolution) for f in files])
        instructions = [config.instructions[i % len(config.instructions)] for i in range(len(files))]
        return Inputs(sources, instructions)
    return _load_jsonl(path, resolution)


def _load_jsonl(path: Path, resolution: int) -> Inputs:
    if not path.is_file():
        raise UserError(f"data.path: JSONL file not found: {path}")
    sources, instructions, masks, exemplars = [], [], [], []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{n}: not valid JSON ({err.msg})") from err
        if not isinstance(record, dict) or "image" not in record:
            raise UserError(f"{path}:{n}: expected an object with an 'image' field")
        instruction = str(record.get("instruction", "")).strip()
        if not instruction:
            raise UserError(f"{path}:{n}: empty instruction for image {record['image']}")
        sources.append(load_image(path.parent / record["image"], resolution))
        instructions.append(instruction)
        masks.append(_load_mask(path.parent / record["mask"], resolution) if record.get("mask") else None)
        exemplars.append(
            load_image(path.parent / record["exemplar"], resolution) if record.get("exemplar") else None
        )
    if not sources:
        raise UserError(f"{path}: no records")

    def stack(items: list) -> torch.Tensor | None:
        if all(x is None for x in items):
            return None
        if any(x is None for x in items):
            raise UserError(f"{path}: give a mask/exemplar for every record or for none")
        return torch.stack(items)

    return Inputs(torch.stack(sources), instructions, stack(masks), stack(exemplars))
