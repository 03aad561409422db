"""A synthetic edit dataset with ground truth: drawn scenes, templated instructions, target edits and masks.

Each sample is a plain background from a named palette with 1-3 non-overlapping named shapes (a
circle, a square, a triangle; each type at most once, so "the circle" is always unique), an
instruction such as "make the circle red", the ground-truth edited image and the edit mask. Four
kinds of edit:

- "recolor": one shape becomes another palette colour (mask: the shape);
- "background": the background becomes another palette colour (mask: the background pixels);
- "remove": one shape is painted over with the background colour (mask: the shape);
- "brighten": the whole image is blended towards white, target = s + amount x (255 - s) (mask: all).

Scenes live on a resolution-free grid, so the same seed gives the same scenes at any resolution.

Splits: a scene goes to the held-out split when a hash of its parameters (background, shapes, colours,
grid positions) says so (one scene in five), else to the train split; the two splits also draw from
different random streams. So no held-out source image ever occurs in the train split, for any seed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ALL_KINDS = ("recolor", "background", "remove", "brighten")
SPLITS = ("train", "heldout")
SHAPES = ("circle", "square", "triangle")
# Named colours, at least 112 apart in RGB (Euclidean, 0-255 units), so a mean colour within 50 of one
# of them is nearer to it than to any other (the oracle's success threshold relies on this).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 235, 60),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "purple": (145, 40, 185),
    "orange": (250, 140, 0),
    "cyan": (50, 215, 225),
}
TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolor": (
        "make the {shape} {colour}",
        "turn the {shape} {colour}",
        "recolour the {shape} {colour}",
        "paint the {shape} {colour}",
    ),
    "background": (
        "turn the background {colour}",
        "make the background {colour}",
        "change the background to {colour}",
    ),
    "remove": ("remove the {shape}", "delete the {shape}", "take away the {shape}"),
    "brighten": ("make it brighter", "brighten the image", "increase the brightness"),
}
BRIGHTEN_AMOUNT = 0.5
# An unedited source must be at least this far (mean colour of the edit region, RGB units) from its
# target, so that "do nothing" never passes the oracle's success test; darker scenes are redrawn.
MIN_EDIT_DISTANCE = 100.0
GRID = 20  # scene coordinates are integers on a GRID x GRID lattice over the image
HELDOUT_EVERY = 5  # one scene hash in HELDOUT_EVERY goes to the held-out split


@dataclass
class EditSample:
    """One synthetic edit.

    Attributes:
        source: (R, R, 3) uint8, the scene before the edit.
        target: (R, R, 3) uint8, the ground-truth edit.
        mask: (R, R) bool, True in the edit region.
        instruction: the edit instruction.
        metadata: JSON-safe facts for the oracle scorer (see `synthetic_edits`).
    """

    source: np.ndarray
    target: np.ndarray
    mask: np.ndarray
    instruction: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Shape:
    kind: str  # "circle", "square" or "triangle"
    colour: str  # palette name
    cx: int  # centre, grid units
    cy: int
    r: int  # half-size, grid units


def _pixel_grid(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """(R, R) grid-unit coordinates (u across, v down) of the pixel centres."""
    c = (np.arange(resolution) + 0.5) * (GRID / resolution)
    return np.meshgrid(c, c, indexing="xy")


def _shape_mask(shape: _Shape, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    du, dv = u - shape.cx, v - shape.cy
    r = float(shape.r)
    if shape.kind == "circle":
        return du**2 + dv**2 <= r * r
    if shape.kind == "square":  # side 1.8 r: about the area of the circle
        return (np.abs(du) <= 0.9 * r) & (np.abs(dv) <= 0.9 * r)
    # Triangle, apex up: height 2 r, base 2.3 r.
    depth = (dv + 1.1 * r) / (2 * r)  # 0 at the apex, 1 at the base
    return (depth >= 0) & (depth <= 1) & (np.abs(du) <= 1.15 * r * depth)


def _draw_scene(rng: np.random.Generator) -> tuple[str, list[_Shape]]:
    """A background colour and 1-3 non-overlapping shapes of distinct types and colours."""
    names = list(PALETTE)
    background = names[int(rng.integers(len(names)))]
    n = int(rng.integers(1, 4))
    kinds = [SHAPES[k] for k in rng.permutation(len(SHAPES))[:n]]
    free = [c for c in names if c != background]
    colours = [free[k] for k in rng.permutation(len(free))[:n]]
    shapes: list[_Shape] = []
    for kind, colour in zip(kinds, colours, strict=True):
        for _ in range(100):
            r = int(rng.integers(3, 5))
            # Keep the whole bounding box (half-size 1.15 r, rounded up) inside the frame.
            lo, hi = r + 2, GRID - r - 2
            cx, cy = (int(x) for x in rng.integers(lo, hi + 1, size=2))
            if all(max(abs(cx - s.cx), abs(cy - s.cy)) >= r + s.r + 2 for s in shapes):
                shapes.append(_Shape(kind, colour, cx, cy, r))
                break
    return background, shapes


def _scene_split(background: str, shapes: list[_Shape]) -> str:
    """The split a scene belongs to, from a hash of its parameters (order-independent)."""
    key = [background, sorted((s.kind, s.colour, s.cx, s.cy, s.r) for s in shapes)]
    digest = hashlib.sha256(json.dumps(key).encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % HELDOUT_EVERY == 0 else "train"


def _render(background: str, shapes: list[_Shape], resolution: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(R, R, 3) uint8 scene and each shape's (R, R) bool mask."""
    u, v = _pixel_grid(resolution)
    image = np.empty((resolution, resolution, 3), dtype=np.uint8)
    image[:] = PALETTE[background]
    masks = []
    for s in shapes:
        m = _shape_mask(s, u, v)
        image[m] = PALETTE[s.colour]
        masks.append(m)
    return image, masks


def _edit(
    rng: np.random.Generator, kind: str, background: str, shapes: list[_Shape], resolution: int
) -> EditSample:
    source, shape_masks = _render(background, shapes, resolution)
    used = {background} | {s.colour for s in shapes}
    meta: dict[str, Any] = {
        "kind": kind,
        "background": background,
        "scene": [{"shape": s.kind, "colour": s.colour} for s in shapes],
    }
    target = source.copy()
    template = TEMPLATES[kind][int(rng.integers(len(TEMPLATES[kind])))]
    if kind == "brighten":
        mask = np.ones((resolution, resolution), dtype=bool)
        target = np.round(source + BRIGHTEN_AMOUNT * (255.0 - source)).astype(np.uint8)
        meta["amount"] = BRIGHTEN_AMOUNT
        return EditSample(source, target, mask, template, meta)
    if kind == "background":
        mask = ~np.any(shape_masks, axis=0) if shape_masks else np.ones(source.shape[:2], dtype=bool)
        region, current = None, background
        choices = [c for c in PALETTE if c not in used]
    else:
        pick = int(rng.integers(len(shapes)))
        region, mask, current = shapes[pick], shape_masks[pick], shapes[pick].colour
        choices = [background] if kind == "remove" else [c for c in PALETTE if c not in used]
    colour = choices[int(rng.integers(len(choices)))]
    target[mask] = PALETTE[colour]
    meta.update(target_rgb=list(PALETTE[colour]), target_colour=colour, colour=current)
    if region is not None:
        meta["shape"] = region.kind
    instruction = template.format(shape=region.kind if region else "", colour=colour)
    return EditSample(source, target, mask, instruction, meta)


def synthetic_edits(
    seed: int,
    count: int,
    resolution: int,
    split: str = "train",
    kinds: tuple[str, ...] = ALL_KINDS,
) -> list[EditSample]:
    """`count` seeded edits of one split; the same (seed, split, kinds) always gives the same samples.

    Kinds cycle in the given order (sample i has kind `kinds[i % len(kinds)]`). Metadata keys:
    `id` ("<split>-<seed>-<i>"), `split`, `kind`, `background` (colour name), `scene` (list of
    {"shape", "colour"}), and per kind: `target_rgb` ([r, g, b] ints, the flat colour the edit region
    must take), `target_colour` and `colour` (names of the asked and the current colour of the region)
    for recolor/background/remove; `shape` (the shape named) for recolor/remove; `amount` (the
    blend towards white, target = s + amount x (255 - s)) for brighten.

    Raises:
        ValueError: an unknown split or kind, count < 0, or a resolution below 16 (shapes would vanish).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    bad = [k for k in kinds if k not in ALL_KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {', '.join(ALL_KINDS)}, got {list(kinds)}")
    if count < 0 or resolution < 16:
        raise ValueError(f"need count >= 0 and resolution >= 16, got {count} and {resolution}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    samples = []
    for i in range(count):
        kind = kinds[i % len(kinds)]
        while True:
            background, shapes = _draw_scene(rng)
            if _scene_split(background, shapes) != split:
                continue
            sample = _edit(rng, kind, background, shapes, resolution)
            m = sample.mask
            gap = np.linalg.norm(sample.source[m].mean(0) - sample.target[m].mean(0))
            if gap >= MIN_EDIT_DISTANCE:
                break
        sample.metadata = {"id": f"{split}-{seed}-{i}", "split": split, **sample.metadata}
        samples.append(sample)
    return samples


def save_synthetic(path: str | Path, samples: list[EditSample]) -> Path:
    """Write samples as PNGs plus `edits.jsonl` in `path` (the "jsonl" data format); returns the JSONL path.

    Each line: {"image", "instruction", "target", "mask", "metadata"}, image paths relative to `path`.
    """
    root = Path(path)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, s in enumerate(samples):
        names = {k: f"images/{i:05d}{suffix}.png" for k, suffix in (("image", ""), ("target", "_target"))}
        names["mask"] = f"images/{i:05d}_mask.png"
        Image.fromarray(s.source).save(root / names["image"])
        Image.fromarray(s.target).save(root / names["target"])
        Image.fromarray(s.mask.astype(np.uint8) * 255).save(root / names["mask"])
        record = {"image": names["image"], "instruction": s.instruction, "target": names["target"]}
        record.update(mask=names["mask"], metadata=s.metadata)
        lines.append(json.dumps(record))
    out = root / "edits.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out
