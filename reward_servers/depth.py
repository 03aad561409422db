"""Depth structural score: Depth Anything V2 (through transformers) on the source and the edit.

score = -mean |d_src - d_edit| over pixels outside the edit mask (all pixels without one), where each
relative depth map d is made scale- and shift-invariant as in MiDaS (Ranftl et al. 2020, eq. 5-6):
d = (D - median(D)) / mean(|D - median(D)|). 0 means identical structure; higher is better.
"""

from __future__ import annotations

import numpy as np

from reward_servers.base import ScoreBatch, ScoreResult, register_scorer
from reward_servers.vision import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_pretrained,
    resize,
    resize_mask,
    save_tiny_model,
    score_valid,
    to_tensor,
)


def normalise_depth(depth: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Scale-and-shift normalise an (H, W) depth map using the statistics of the `keep` pixels."""
    values = depth[keep] if keep is not None and keep.any() else depth.reshape(-1)
    shift = np.median(values)
    scale = np.mean(np.abs(values - shift))
    return (depth - shift) / max(scale, 1e-8)


@register_scorer("depth_structure")
class DepthStructureScorer:
    """Negative L1 between normalised Depth Anything depth maps of source and edit.

    Args:
        model_id: hub id or local folder of a DepthAnythingForDepthEstimation checkpoint.
        device: torch device.
        dtype: float32, float16 or bfloat16.
        input_size: side of the square model input (a multiple of the patch size, 14).
        max_batch_size: most items per forward pass (each item is two images).
    """

    name = "depth_structure"
    version = "1"
    higher_is_better = True

    def __init__(
        self,
        model_id: str = "depth-anything/Depth-Anything-V2-Small-hf",
        device: str = "cpu",
        dtype: str = "float32",
        input_size: int = 518,
        max_batch_size: int = 16,
    ) -> None:
        from transformers import DepthAnythingForDepthEstimation

        self.model = load_pretrained(DepthAnythingForDepthEstimation, model_id, device, dtype)
        patch = self.model.config.patch_size
        if input_size % patch:
            raise ValueError(f"input_size {input_size} must be a multiple of the patch size {patch}")
        self.model_id, self.device, self.input_size = model_id, device, input_size
        self.max_batch_size = max_batch_size

    def preprocess(self, images: list[np.ndarray]):
        """N (H, W, 3) uint8 -> (N, 3, S, S) float, bicubic resize and ImageNet normalisation."""
        size = (self.input_size, self.input_size)
        return to_tensor([resize(im, size) for im in images], IMAGENET_MEAN, IMAGENET_STD, self.device)

    def depth(self, images: list[np.ndarray]) -> np.ndarray:
        """N images -> (N, S, S) float64 relative depth (larger: nearer)."""
        import torch

        with torch.inference_mode():
            pixels = self.preprocess(images).to(self.model.dtype)
            return self.model(pixel_values=pixels).predicted_depth.float().cpu().numpy().astype(np.float64)

    def score(self, batch: ScoreBatch) -> ScoreResult:
        def run(valid: list[int]):
            depths = self.depth([batch.edited[i] for i in valid] + [batch.sources[i] for i in valid])
            n, scores, details = len(valid), [], []
            for k, i in enumerate(valid):
                mask = batch.mask(i)
                keep = None if mask is None else ~resize_mask(mask, depths.shape[1:])
                edit, source = normalise_depth(depths[k], keep), normalise_depth(depths[n + k], keep)
                diff = np.abs(edit - source)
                l1 = float(diff[keep].mean()) if keep is not None and keep.any() else float(diff.mean())
                scores.append(-l1)
                details.append({"depth_l1": l1})
            return scores, details

        return score_valid(batch, True, run)


def save_tiny(folder: str, seed: int = 0) -> str:
    """A tiny random Depth Anything (Dinov2 backbone, hidden 32, 4 layers) saved to `folder`;
    use with input_size=56."""
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    backbone = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=56,
        patch_size=14,
        out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone,
        patch_size=14,
        reassemble_hidden_size=32,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        head_hidden_size=8,
    )
    return save_tiny_model(DepthAnythingForDepthEstimation, config, folder, seed)
