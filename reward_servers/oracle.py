"""Oracle scorers for the synthetic edit dataset (`sampler/synthetic.py`): weight-free judges that know
the ground truth carried in each item's mask and metadata.

`oracle_edit` (the demo's semantic judge) asks whether the edit region took the asked colour or change:

- recolor / background / remove (metadata `target_rgb`): colour_error is the Euclidean distance, in
  0-255 RGB units, between the edit's mean colour inside the mask and `target_rgb`;
- brighten (metadata `amount`): the expected image is s + amount x (255 - s); colour_error is the
  distance between the edit's and the expected image's mean colours inside the mask (the whole frame
  when the item has no mask). `gain` reports the fitted blend amount (least squares of
  edit - s = gain x (255 - s)).

score = exp(-colour_error / colour_scale) in (0, 1]; `success` is 1.0 when colour_error <
`success_error` (default 50), else 0.0. The synthetic palette keeps its colours at least 112 apart, so
a success means the region's mean colour is nearer the asked colour than any other palette colour.

`structure` (in the details of `oracle_edit`, and the score of `oracle_structure`, which needs no
metadata) is SSIM with the source outside the mask (the whole frame for an item without one): the
edit's pixels inside the mask are replaced by the source's, and the SSIM map is averaged over the
windows centred outside the mask, so what happens inside the mask cannot count (unlike
`ssim_structure`, whose windows straddle the mask border) and the ground truth scores exactly 1. For
brighten, whose mask is the whole frame, it is the SSIM with the expected brightened image over the
whole frame.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from reward_servers.base import ScoreBatch, ScoreResult, register_scorer
from reward_servers.weightfree import _as_float, _per_item, ssim_map

FLAT_KINDS = ("recolor", "background", "remove")
KINDS = (*FLAT_KINDS, "brighten")
GREY = np.array([0.299, 0.587, 0.114])


def _target_rgb(meta: dict[str, Any]) -> np.ndarray:
    value = meta.get("target_rgb")
    ok = isinstance(value, list | tuple) and len(value) == 3
    if not ok or not all(isinstance(v, int | float) and 0 <= v <= 255 for v in value):
        raise ValueError(f"metadata.target_rgb: expected [r, g, b] in 0-255, got {value!r}")
    return np.asarray(value, dtype=np.float64)


def _amount(meta: dict[str, Any]) -> float:
    value = meta.get("amount")
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value <= 1:
        raise ValueError(f"metadata.amount: expected a number in (0, 1] for a brighten edit, got {value!r}")
    return float(value)


def _ssim_outside(edit: np.ndarray, reference: np.ndarray, mask: np.ndarray, window: int) -> float:
    """Mean SSIM of two (H, W, 3) float images over windows centred outside `mask` ((H, W) bool);
    the edit's pixels inside the mask are replaced by the reference's first. 1.0 if no window is."""
    composite = np.where(mask[:, :, None], reference, edit)
    smap = ssim_map(composite @ GREY, reference @ GREY, window)
    w = edit.shape[0] - smap.shape[0] + 1
    centre = w // 2
    keep = ~mask[centre : centre + smap.shape[0], centre : centre + smap.shape[1]]
    return float(smap[keep].mean()) if keep.any() else 1.0


class _OracleBase:
    version = "1"
    model_id = ""
    higher_is_better = True

    def __init__(
        self,
        colour_scale: float = 50.0,
        success_error: float = 50.0,
        window: int = 7,
        max_batch_size: int = 256,
    ) -> None:
        if colour_scale <= 0 or success_error <= 0:
            raise ValueError("colour_scale and success_error must be > 0")
        self.colour_scale = colour_scale
        self.success_error = success_error
        self.window = window
        self.max_batch_size = max_batch_size

    def _images(self, batch: ScoreBatch, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(edit, source) as (H, W, 3) float in 0-255 and the (H, W) bool mask or None, checked."""
        edit, source = _as_float(batch.edited[i]) * 255.0, _as_float(batch.sources[i]) * 255.0
        if edit.shape != source.shape:
            raise ValueError(f"source {source.shape[:2]} and edit {edit.shape[:2]} sizes differ")
        mask = batch.mask(i)
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != edit.shape[:2]:
                raise ValueError(f"mask {mask.shape} does not match image {edit.shape[:2]}")
        return edit, source, mask

    def structure(self, batch: ScoreBatch, i: int) -> float:
        """SSIM with the source outside item i's mask (the whole frame without a mask); for a
        brighten item, SSIM with the expected brightened image over the whole frame."""
        edit, source, mask = self._images(batch, i)
        meta = batch.meta(i)
        if meta.get("kind") == "brighten":
            amount = _amount(meta)
            expected = source + amount * (255.0 - source)
            return _ssim_outside(edit / 255.0, expected / 255.0, np.zeros(edit.shape[:2], bool), self.window)
        outside = np.zeros(edit.shape[:2], bool) if mask is None else mask
        return _ssim_outside(edit / 255.0, source / 255.0, outside, self.window)

    def judge(self, batch: ScoreBatch, i: int) -> dict[str, float]:
        """Details of item i: colour_score, colour_error, success, structure (and gain for brighten)."""
        edit, source, mask = self._images(batch, i)
        meta = batch.meta(i)
        kind = meta.get("kind")
        if kind not in KINDS:
            raise ValueError(f"metadata.kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        if mask is None:
            if kind != "brighten":
                raise ValueError(f"mask: a {kind} edit needs its edit mask")
            mask = np.ones(edit.shape[:2], dtype=bool)
        if not mask.any():
            raise ValueError("mask: the edit region is empty")
        out: dict[str, float] = {}
        if kind == "brighten":
            room = 255.0 - source
            wanted = (source + _amount(meta) * room)[mask].mean(0)
            d = room[mask]
            out["gain"] = float(((edit - source)[mask] * d).sum() / max((d * d).sum(), 1e-9))
        else:
            wanted = _target_rgb(meta)
        error = float(np.linalg.norm(edit[mask].mean(0) - wanted))
        out["colour_error"] = error
        out["colour_score"] = math.exp(-error / self.colour_scale)
        out["success"] = 1.0 if error < self.success_error else 0.0
        out["structure"] = self.structure(batch, i)
        return out


@register_scorer("oracle_edit")
class OracleEditScorer(_OracleBase):
    """Did the edit region take the asked colour or change? exp(-colour_error / colour_scale) in (0, 1].

    Needs per-item metadata `kind` plus `target_rgb` (recolor/background/remove) or `amount`
    (brighten), and the edit mask (optional for brighten). Details: success, colour_error,
    colour_score, structure (and gain for brighten). See the module docstring.
    """

    name = "oracle_edit"

    def score(self, batch: ScoreBatch) -> ScoreResult:
        def one(i: int) -> tuple[float, dict[str, float]]:
            details = self.judge(batch, i)
            return details["colour_score"], details

        return _per_item(batch, one)

    def score_differentiable(self, images, batch: ScoreBatch):
        """(B, 3, H, W) edits in [0, 1] -> (B,) exp(-smooth_error / colour_scale), where smooth_error
        = sqrt(|mean colour inside the mask - wanted|^2 + 1) in 0-255 units: the colour error made
        smooth at 0 (it differs from `colour_error` by at most 1)."""
        import torch

        out = []
        for i in range(images.shape[0]):
            _, source, mask = self._images(batch, i)
            meta = batch.meta(i)
            kind = meta.get("kind")
            if kind not in KINDS:
                raise ValueError(f"metadata.kind: expected one of {', '.join(KINDS)}, got {kind!r}")
            if mask is None:
                if kind != "brighten":
                    raise ValueError(f"mask: a {kind} edit needs its edit mask")
                mask = np.ones(source.shape[:2], dtype=bool)
            if not mask.any():
                raise ValueError("mask: the edit region is empty")
            if kind == "brighten":
                wanted = (source + _amount(meta) * (255.0 - source))[mask].mean(0)
            else:
                wanted = _target_rgb(meta)
            inside = torch.from_numpy(mask).to(images.device)
            mean = (images[i] * 255.0).permute(1, 2, 0)[inside].mean(0)
            d = mean - torch.as_tensor(wanted, dtype=images.dtype, device=images.device)
            out.append(torch.exp(-torch.sqrt((d * d).sum() + 1.0) / self.colour_scale))
        return torch.stack(out)


@register_scorer("oracle_structure")
class OracleStructureScorer(_OracleBase):
    """SSIM with the source outside the edit mask, blind to the mask's inside (1 = structure kept).

    Needs no metadata (an item without a mask is compared over the whole frame), except that a
    brighten item (metadata `kind`, `amount`) is compared with its expected brightened image.
    """

    name = "oracle_structure"

    def score(self, batch: ScoreBatch) -> ScoreResult:
        def one(i: int) -> tuple[float, dict[str, float]]:
            structure = self.structure(batch, i)
            return structure, {"structure": structure}

        return _per_item(batch, one)

    def score_differentiable(self, images, batch: ScoreBatch):
        """(B, 3, H, W) edits in [0, 1] -> (B,) the same SSIM as `structure`, in torch: the edit's
        pixels inside the mask replaced by the reference's, windows centred outside the mask."""
        import torch

        from reward_servers.weightfree import ssim_map_torch

        grey = torch.tensor(GREY, dtype=images.dtype, device=images.device)
        out = []
        for i in range(images.shape[0]):
            _, source, mask = self._images(batch, i)
            meta = batch.meta(i)
            if meta.get("kind") == "brighten":
                reference, mask = source + _amount(meta) * (255.0 - source), np.zeros(source.shape[:2], bool)
            else:
                reference = source
                mask = np.zeros(source.shape[:2], bool) if mask is None else mask
            ref = torch.as_tensor(reference / 255.0, dtype=images.dtype, device=images.device).permute(
                2, 0, 1
            )
            inside = torch.from_numpy(mask).to(images.device)
            composite = torch.where(inside, ref, images[i])
            smap = ssim_map_torch(
                torch.einsum("chw,c->hw", composite, grey), torch.einsum("chw,c->hw", ref, grey), self.window
            )
            w = images.shape[2] - smap.shape[0] + 1
            c = w // 2
            keep = ~inside[c : c + smap.shape[0], c : c + smap.shape[1]]
            out.append(smap[keep].mean() if keep.any() else smap.new_tensor(1.0))
        return torch.stack(out)
