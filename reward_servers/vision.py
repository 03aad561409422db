"""Shared pieces of the model-backed scorers: per-item validation, image preprocessing with PIL and
torch only (no torchvision), devices and dtypes, and seeded tiny-model saving.

Preprocessing resizes each image on its own with PIL, so an item is preprocessed identically alone or
inside a batch (batch invariance starts here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from reward_servers.base import ScoreBatch, ScoreResult

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_items(batch: ScoreBatch, same_size: bool) -> list[str | None]:
    """One entry per item: None if the scorer can take it, else a one-line reason."""
    errors: list[str | None] = []
    for i in range(len(batch)):
        edit, source = batch.edited[i], batch.sources[i]
        error = None
        for name, image in (("edited", edit), ("source", source)):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
                error = f"{name}: expected a non-empty (H, W, 3) uint8 image, got {image.dtype} {image.shape}"
        if error is None and same_size and edit.shape != source.shape:
            error = f"source {source.shape[1]}x{source.shape[0]} and edit {edit.shape[1]}x{edit.shape[0]} sizes differ"
        mask = batch.mask(i)
        if error is None and mask is not None and mask.shape != edit.shape[:2]:
            error = f"mask {mask.shape[1]}x{mask.shape[0]} does not match the edit {edit.shape[1]}x{edit.shape[0]}"
        errors.append(error)
    return errors


def score_valid(
    batch: ScoreBatch,
    same_size: bool,
    fn: Callable[[list[int]], tuple[Sequence[float], Sequence[dict[str, float]]]],
    check: Callable[[int], str | None] | None = None,
) -> ScoreResult:
    """Run `fn(valid_indices) -> (scores, details)` on the items that pass `check_items` (and the
    scorer's own `check(index) -> one-line reason or None`); the others get NaN and their error."""
    errors = check_items(batch, same_size)
    if check is not None:
        errors = [e or check(i) for i, e in enumerate(errors)]
    valid = [i for i, e in enumerate(errors) if e is None]
    scores = np.full(len(batch), np.nan)
    details: list[dict[str, float]] = [{} for _ in range(len(batch))]
    if valid:
        got, info = fn(valid)
        for k, i in enumerate(valid):
            scores[i], details[i] = float(got[k]), dict(info[k])
    return ScoreResult(scores, details, errors)


def resize(image: np.ndarray, size: tuple[int, int], resample: str = "bicubic") -> np.ndarray:
    """(H, W, C) uint8 -> (size[0], size[1], C) uint8 with PIL (size is (height, width))."""
    method = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}[resample]
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), method))


def score_against_source(
    batch: ScoreBatch,
    maps: Callable[[list[np.ndarray]], np.ndarray],
    compare: Callable[[np.ndarray, np.ndarray, np.ndarray | None], tuple[float, dict[str, float]]],
) -> ScoreResult:
    """Score each item by comparing a per-pixel map of its edit with that of its source, outside the
    edit mask (`score_valid` with equal sizes): `maps(images)` turns the N valid edits followed by
    their N sources into (2N, H', W') maps in one call; `compare(edit_map, source_map, keep)` returns
    (score, details), `keep` being the (H', W') pixels outside the mask, or None without one."""

    def run(valid: list[int]):
        out = maps([batch.edited[i] for i in valid] + [batch.sources[i] for i in valid])
        n, scores, details = len(valid), [], []
        for k, i in enumerate(valid):
            mask = batch.mask(i)
            keep = None if mask is None else ~resize_mask(mask, out.shape[1:])
            score, detail = compare(out[k], out[n + k], keep)
            scores.append(score)
            details.append(detail)
        return scores, details

    return score_valid(batch, True, run)


def resize_short_center_crop(image: np.ndarray, side: int) -> np.ndarray:
    """CLIP-style: resize the short side to `side` (bicubic), then crop the central side x side."""
    h, w = image.shape[:2]
    scale = side / min(h, w)
    nh, nw = max(side, round(h * scale)), max(side, round(w * scale))
    resized = resize(image, (nh, nw))
    top, left = (nh - side) // 2, (nw - side) // 2
    return resized[top : top + side, left : left + side]


def to_tensor(images: Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float], torch_device=None):
    """N (H, W, 3) uint8 images of equal size -> (N, 3, H, W) float32, (x / 255 - mean) / std."""
    import torch

    array = np.stack(images).astype(np.float32) / 255.0
    array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous().to(torch_device or "cpu")


def preprocess_differentiable(images, side: int, mean: Sequence[float], std: Sequence[float]):
    """`resize_short_center_crop` then `to_tensor` in torch, differentiable: (B, 3, H, W) in [0, 1]
    -> (B, 3, side, side) normalised. Bicubic with antialiasing (torch's, not PIL's: values differ
    from the uint8 path by a few 1e-3)."""
    import torch
    import torch.nn.functional as F

    h, w = images.shape[-2:]
    scale = side / min(h, w)
    nh, nw = max(side, round(h * scale)), max(side, round(w * scale))
    if (nh, nw) != (h, w):
        images = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - side) // 2, (nw - side) // 2
    images = images[:, :, top : top + side, left : left + side]
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - m) / s


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool -> (size[0], size[1]) bool, nearest neighbour."""
    return resize(mask.astype(np.uint8) * 255, size, "nearest") > 127


def torch_dtype(name: str):
    """ "float32" / "float16" / "bfloat16" -> torch dtype (ValueError naming the field otherwise)."""
    import torch

    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def load_pretrained(cls: Any, model_id: str, device: str, dtype: str, **kwargs: Any):
    """`cls.from_pretrained(model_id)` (hub id or local folder) in eval mode on `device`;
    FileNotFoundError for a path (absolute, or starting with `.`) that is no folder."""
    if model_id.startswith(("/", ".", "~")) and not Path(model_id).expanduser().is_dir():
        raise FileNotFoundError(f"model_id {model_id}: no such folder")
    model = cls.from_pretrained(model_id, dtype=torch_dtype(dtype), **kwargs)
    return model.to(device).eval()


class SquareInputModel:
    """What the scorers that run one transformers vision model on square, ImageNet-normalised inputs
    share (depth, segmentation, exemplar): loading with the patch-size check, and preprocessing."""

    resample = "bicubic"  # how `preprocess` resizes
    patch_multiple = True  # `input_size` must be a multiple of the model's patch size

    def load_model(
        self, model_cls: Any, model_id: str, device: str, dtype: str, input_size: int, max_batch_size: int
    ) -> None:
        """`self.model` from `model_id`, and the settings kept; ValueError if `patch_multiple` and
        `input_size` is not a multiple of the model's patch size."""
        self.model = load_pretrained(model_cls, model_id, device, dtype)
        if self.patch_multiple:
            patch = int(self.model.config.patch_size)
            if input_size % patch:
                raise ValueError(f"input_size {input_size} must be a multiple of the patch size {patch}")
        self.model_id, self.device, self.input_size = model_id, device, input_size
        self.max_batch_size = max_batch_size

    def preprocess(self, images: list[np.ndarray]):
        """N (H, W, 3) uint8 -> (N, 3, S, S) float, `resample` resize and ImageNet normalisation."""
        size = (self.input_size, self.input_size)
        return to_tensor(
            [resize(im, size, self.resample) for im in images], IMAGENET_MEAN, IMAGENET_STD, self.device
        )


def save_tiny_model(model_cls: Any, config: Any, folder: str, seed: int = 0) -> str:
    """Build `model_cls(config)` with seeded random weights and `save_pretrained` it to `folder`."""
    import torch

    torch.manual_seed(seed)
    model_cls(config).eval().save_pretrained(folder)
    return folder
