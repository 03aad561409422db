"""Per-item evaluation metrics and their aggregates, for `spie evaluate`.

Per item (images in [0, 1], shapes (M, 3, R, R), masks (R, R) bool, True inside the edit region):
- `l2_outside_mask`: SPIE's reconstruction metric, the mean squared difference between edit and
  source over the pixels (and the 3 channels) outside the edit mask; NaN for an item without a mask;
- with a CLIP model (transformers `CLIPModel`, a local folder or a hub id), computed by the
  registered `clip` scorer (reward_servers/clip_score.py):
  `clip_text_image`, the cosine between the edit's image embedding and the text embedding of the
  item's `target_caption` (metadata) or else its instruction; `clip_image`, the cosine between the
  image embeddings of edit and source; `clip_direction`, the directional similarity of Gal et al.
  (StyleGAN-NADA) used by InstructPix2Pix: cos(E(edit) - E(source), T(target_caption) -
  T(source_caption)) when the metadata has both captions, else cos(E(edit) - E(source),
  T(instruction));
- every configured reward scorer: `<name>` is its score as the scorer gives it, `<name>.<key>` each
  number of its per-item details (e.g. `oracle_edit.success`).

Aggregates: the mean with a percentile bootstrap interval, and for two models evaluated on the same
items the paired difference (B - A) with its own bootstrap interval.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from reward_servers.base import ScoreBatch, Scorer
from sampler.rollout import to_uint8
from trainer.errors import UserError
from trainer.rewards.inprocess import call_scorers
from trainer.rewards.scores import details_arrays

# Whether a larger value is better, for metrics that are not reward scorers.
BUILTIN_DIRECTION = {
    "l2_outside_mask": False,
    "clip_text_image": True,
    "clip_image": True,
    "clip_direction": True,
}


def l2_outside_mask(
    edited: torch.Tensor, sources: torch.Tensor, masks: list[torch.Tensor | None]
) -> np.ndarray:
    """(M,) MSE between edit and source outside each item's mask (NaN without a mask).

    Args:
        edited, sources: (M, 3, R, R) in [0, 1].
        masks: M entries, (R, R) bool or None.
    """
    out = np.full(len(masks), np.nan)
    for i, mask in enumerate(masks):
        if mask is None:
            continue
        keep = ~mask.bool().cpu()
        if keep.any():
            diff = (edited[i].double().cpu() - sources[i].double().cpu()) ** 2  # (3, R, R)
            out[i] = float(diff[:, keep].mean())
    return out


class ClipMetric:
    """CLIP text-image, image-image and directional similarities, through the registered `clip`
    scorer (`reward_servers/clip_score.py`), so evaluation, training and a reward server compute
    them the same way.

    Args:
        model_id: a local folder or hub id holding a transformers `CLIPModel` and its tokenizer.
        device: where the model runs.
    """

    def __init__(self, model_id: str, device: str | torch.device = "cpu") -> None:
        from reward_servers.base import build_scorer

        try:
            self.scorer = build_scorer("clip", model_id=model_id, device=str(device))
        except (OSError, ValueError) as err:
            raise UserError(f"--clip-model: cannot load {model_id!r}: {str(err).splitlines()[0]}") from err
        self.tokenizer = self.scorer.tokenizer

    def __call__(
        self, edited: torch.Tensor, sources: torch.Tensor, instructions: list[str], metadata: list[dict]
    ) -> dict[str, np.ndarray]:
        """M edits (M, 3, R, R) in [0, 1] -> {"clip_text_image", "clip_image", "clip_direction"}: (M,)."""
        batch = ScoreBatch(to_uint8(edited), to_uint8(sources), list(instructions), metadata=list(metadata))
        details = self.scorer.score(batch).details
        return {
            k: np.array([d.get(k, math.nan) for d in details])
            for k in BUILTIN_DIRECTION
            if k != "l2_outside_mask"
        }


def score_with(
    scorers: dict[str, Scorer],
    edited: torch.Tensor,
    sources: torch.Tensor,
    instructions: list[str],
    masks: list[torch.Tensor | None],
    metadata: list[dict],
) -> tuple[dict[str, np.ndarray], list[dict[str, str]], list[dict[str, str]]]:
    """Score M edits with every scorer (through training's in-process loop, `call_scorers`).

    Returns:
        metric name -> (M,) float64 (`<name>` and `<name>.<detail>`, NaN where missing); M dicts
        scorer name -> error message for the items a scorer refused; M dicts `<name>.<text>` -> the
        scorers' per-item texts (a generative judge's reasoning), empty for scorers without any.
    """
    mask_np = [None if k is None else k.bool().cpu().numpy() for k in masks]
    batch = ScoreBatch(to_uint8(edited), to_uint8(sources), instructions, masks=mask_np, metadata=metadata)
    values: dict[str, np.ndarray] = {}
    errors: list[dict[str, str]] = [{} for _ in range(len(instructions))]
    texts: list[dict[str, str]] = [{} for _ in range(len(instructions))]
    for name, result in call_scorers(scorers, batch).items():
        values[name] = result.scores
        values.update(details_arrays(name, result.details))
        for k, (err, text) in enumerate(zip(result.errors, result.texts, strict=True)):
            if err is not None:
                errors[k][name] = err
            texts[k].update({f"{name}.{key}": value for key, value in text.items()})
    return values, errors, texts


# --------------------------------------------------------------------------- aggregates


def bootstrap_ci(
    values: np.ndarray, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (finite entries only), seeded.

    Draws `resamples` samples of n = len(values) with replacement; the interval is the
    ((1 - confidence) / 2, (1 + confidence) / 2) quantiles of their means.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def summarize(values: np.ndarray, resamples: int, confidence: float, seed: int) -> dict[str, Any]:
    """{"mean", "std", "n", "ci_low", "ci_high"} of the finite entries of (M,) `values`."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    low, high = bootstrap_ci(x, resamples, confidence, seed)
    return {
        "mean": float(x.mean()) if x.size else math.nan,
        "std": float(x.std()) if x.size else math.nan,
        "n": int(x.size),
        "ci_low": low,
        "ci_high": high,
    }


def paired_difference(
    a: np.ndarray, b: np.ndarray, resamples: int, confidence: float, seed: int
) -> dict[str, Any]:
    """Mean of b - a over the items finite in both, its bootstrap interval and whether it excludes 0."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    both = np.isfinite(a) & np.isfinite(b)
    out = summarize(b[both] - a[both], resamples, confidence, seed)
    out["excludes_zero"] = bool(out["n"] > 0 and (out["ci_low"] > 0 or out["ci_high"] < 0))
    return out
