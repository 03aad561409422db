"""Segmentation structural score: SegFormer (through transformers) label maps of source and edit.

score = mIoU between the two label maps, over pixels outside the edit mask (all pixels without one):
the mean, over classes present in either map, of |A=c and B=c| / |A=c or B=c|. 1 means the layout of
everything the edit should not touch is unchanged.
"""

from __future__ import annotations

import numpy as np

from reward_servers.base import ScoreBatch, ScoreResult, register_scorer
from reward_servers.vision import SquareInputModel, save_tiny_model, score_against_source


def mean_iou(a: np.ndarray, b: np.ndarray, keep: np.ndarray | None = None) -> float:
    """mIoU of two (H, W) integer label maps over the `keep` pixels (1.0 when none are kept)."""
    if keep is not None:
        a, b = a[keep], b[keep]
    a, b = a.reshape(-1), b.reshape(-1)
    if a.size == 0:
        return 1.0
    ious = []
    for c in np.union1d(a, b):
        in_a, in_b = a == c, b == c
        ious.append(np.logical_and(in_a, in_b).sum() / np.logical_or(in_a, in_b).sum())
    return float(np.mean(ious))


@register_scorer("segmentation_structure")
class SegmentationStructureScorer(SquareInputModel):
    """mIoU of SegFormer label maps of source and edit, outside the edit mask.

    Args:
        model_id: hub id or local folder of a SegformerForSemanticSegmentation checkpoint.
        device: torch device.
        dtype: float32, float16 or bfloat16.
        input_size: side of the square model input (ADE20k checkpoints use 512).
        max_batch_size: most items per forward pass (each item is two images).
    """

    name = "segmentation_structure"
    version = "1"
    higher_is_better = True
    resample = "bilinear"
    patch_multiple = False  # SegFormer's overlapping patch embeddings take any input size

    def __init__(
        self,
        model_id: str = "nvidia/segformer-b0-finetuned-ade-512-512",
        device: str = "cpu",
        dtype: str = "float32",
        input_size: int = 512,
        max_batch_size: int = 16,
    ) -> None:
        from transformers import SegformerForSemanticSegmentation

        self.load_model(SegformerForSemanticSegmentation, model_id, device, dtype, input_size, max_batch_size)

    def labels(self, images: list[np.ndarray]) -> np.ndarray:
        """N images -> (N, S/4, S/4) int64 label maps (argmax of the logits)."""
        import torch

        with torch.inference_mode():
            logits = self.model(pixel_values=self.preprocess(images).to(self.model.dtype)).logits
            return logits.argmax(1).cpu().numpy()

    def score(self, batch: ScoreBatch) -> ScoreResult:
        def compare(edit: np.ndarray, source: np.ndarray, keep: np.ndarray | None):
            miou = mean_iou(edit, source, keep)
            return miou, {"miou": miou, "pixel_agreement": float((edit == source).mean())}

        return score_against_source(batch, self.labels, compare)


def save_tiny(folder: str, seed: int = 0, num_labels: int = 6) -> str:
    """A tiny random SegFormer (2 stages, hidden 16/32, `num_labels` classes) saved to `folder`."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[16, 32],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=num_labels,
    )
    return save_tiny_model(SegformerForSemanticSegmentation, config, folder, seed)
