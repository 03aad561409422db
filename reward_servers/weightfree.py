"""Weight-free scorers: brightness, JPEG compressibility and SSIM structure preservation.

They need no model download, so they run everywhere (tests, the CPU demo) and serve as the
reference implementations of the `Scorer` protocol.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from reward_servers.base import ScoreBatch, ScoreResult, register_scorer


def _as_float(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W, 3) float64 in [0, 1]."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    return image.astype(np.float64) / 255.0


def _per_item(batch: ScoreBatch, fn) -> ScoreResult:
    """Apply `fn(i) -> (score, details)` to every item; a failing item gets NaN and its error."""
    scores, details, errors = [], [], []
    for i in range(len(batch)):
        try:
            score, info = fn(i)
            scores.append(float(score))
            details.append(info)
            errors.append(None)
        except ValueError as err:
            scores.append(float("nan"))
            details.append({})
            errors.append(str(err))
    return ScoreResult(np.array(scores), details, errors)


@register_scorer("brightness")
class BrightnessScorer:
    """Mean pixel intensity of the edit in [0, 1] (SPIE's `light_reward`, DDPO-style sanity reward)."""

    name = "brightness"
    version = "1"
    model_id = ""
    higher_is_better = True

    def __init__(self, max_batch_size: int = 256) -> None:
        self.max_batch_size = max_batch_size

    def score(self, batch: ScoreBatch) -> ScoreResult:
        return _per_item(batch, lambda i: (_as_float(batch.edited[i]).mean(), {}))

    def score_differentiable(self, images, batch: ScoreBatch):
        """(B, 3, H, W) in [0, 1] -> (B,) mean intensity (the same number as `score` on the uint8 edit)."""
        return images.mean(dim=(1, 2, 3))


@register_scorer("jpeg_compressibility")
class JpegCompressibilityScorer:
    """Negative JPEG size in KiB at a fixed quality (DDPO's compressibility reward)."""

    name = "jpeg_compressibility"
    version = "1"
    model_id = ""
    higher_is_better = True

    def __init__(self, quality: int = 95, max_batch_size: int = 256) -> None:
        self.quality = quality
        self.max_batch_size = max_batch_size

    def _one(self, image: np.ndarray) -> tuple[float, dict[str, float]]:
        _as_float(image)  # validates shape and dtype
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=self.quality)
        kib = buffer.tell() / 1024.0
        return -kib, {"jpeg_kib": kib}

    def score(self, batch: ScoreBatch) -> ScoreResult:
        return _per_item(batch, lambda i: self._one(batch.edited[i]))


def _box_filter(x: np.ndarray, size: int) -> np.ndarray:
    """Mean over a `size` x `size` window ('valid' region) of an (H, W) array, via an integral image."""
    c = np.pad(x, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    return (c[size:, size:] - c[:-size, size:] - c[size:, :-size] + c[:-size, :-size]) / (size * size)


def ssim_map(a: np.ndarray, b: np.ndarray, window: int = 7) -> np.ndarray:
    """Structural similarity (Wang et al. 2004, eq. 13) on grey levels, with a uniform window.

    Args:
        a, b: (H, W) float arrays in [0, 1].
        window: side of the square window; clipped to the image size.

    Returns:
        (H - w + 1, W - w + 1) map of local SSIM values in [-1, 1].
    """
    w = max(1, min(window, a.shape[0], a.shape[1]))
    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = _box_filter(a, w), _box_filter(b, w)
    var_a = _box_filter(a * a, w) - mu_a**2
    var_b = _box_filter(b * b, w) - mu_b**2
    cov = _box_filter(a * b, w) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


@register_scorer("ssim_structure")
class SsimStructureScorer:
    """SSIM between source and edit, outside the edit mask when one is given (1 = structure kept).

    `rec_lambda` > 0 subtracts SPIE's reconstruction term: `rec_lambda` x MSE outside the mask.
    """

    name = "ssim_structure"
    version = "1"
    model_id = ""
    higher_is_better = True

    def __init__(self, window: int = 7, rec_lambda: float = 0.0, max_batch_size: int = 256) -> None:
        self.window = window
        self.rec_lambda = rec_lambda
        self.max_batch_size = max_batch_size

    def _one(self, batch: ScoreBatch, i: int) -> tuple[float, dict[str, float]]:
        edit, source = _as_float(batch.edited[i]), _as_float(batch.sources[i])
        if edit.shape != source.shape:
            raise ValueError(f"source {source.shape[:2]} and edit {edit.shape[:2]} sizes differ")
        grey = np.array([0.299, 0.587, 0.114])
        smap = ssim_map(edit @ grey, source @ grey, self.window)
        keep = np.ones(edit.shape[:2], dtype=bool)
        mask = batch.mask(i)
        if mask is not None:
            if mask.shape != edit.shape[:2]:
                raise ValueError(f"mask {mask.shape} does not match image {edit.shape[:2]}")
            keep = ~mask.astype(bool)
        # A window counts as "outside" when its top-left pixel is outside the mask.
        w = edit.shape[0] - smap.shape[0] + 1
        keep_map = keep[: smap.shape[0], : smap.shape[1]] if w > 1 else keep
        ssim = float(smap[keep_map].mean()) if keep_map.any() else 1.0
        mse = float(((edit - source) ** 2)[keep].mean()) if keep.any() else 0.0
        return ssim - self.rec_lambda * mse, {"ssim": ssim, "mse_outside": mse}

    def score(self, batch: ScoreBatch) -> ScoreResult:
        return _per_item(batch, lambda i: self._one(batch, i))

    def score_differentiable(self, images, batch: ScoreBatch):
        """(B, 3, H, W) edits in [0, 1] -> (B,) the same SSIM minus rec_lambda x MSE as `score`,
        computed in torch on the float edit (windows and mask as in `_one`)."""
        import torch

        grey = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device)
        out = []
        for i in range(images.shape[0]):
            edit = images[i]
            source = torch.from_numpy(_as_float(batch.sources[i])).to(images).permute(2, 0, 1)
            if edit.shape != source.shape:
                raise ValueError(
                    f"source {tuple(source.shape[1:])} and edit {tuple(edit.shape[1:])} sizes differ"
                )
            smap = ssim_map_torch(
                torch.einsum("chw,c->hw", edit, grey), torch.einsum("chw,c->hw", source, grey), self.window
            )
            mask = batch.mask(i)
            keep = torch.ones(edit.shape[1:], dtype=torch.bool, device=images.device)
            if mask is not None:
                keep = ~torch.from_numpy(np.asarray(mask, dtype=bool)).to(images.device)
            keep_map = keep[: smap.shape[0], : smap.shape[1]]
            ssim = smap[keep_map].mean() if keep_map.any() else smap.new_tensor(1.0)
            mse = ((edit - source) ** 2).permute(1, 2, 0)[keep].mean() if keep.any() else smap.new_tensor(0.0)
            out.append(ssim - self.rec_lambda * mse)
        return torch.stack(out)


def ssim_map_torch(a, b, window: int = 7):
    """`ssim_map` in torch (differentiable): (H, W) tensors in [0, 1] -> (H - w + 1, W - w + 1)."""
    import torch.nn.functional as F

    w = max(1, min(window, a.shape[0], a.shape[1]))
    c1, c2 = 0.01**2, 0.03**2

    def box(x):
        return F.avg_pool2d(x[None, None], w, stride=1)[0, 0]

    mu_a, mu_b = box(a), box(b)
    var_a = box(a * a) - mu_a**2
    var_b = box(b * b) - mu_b**2
    cov = box(a * b) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
