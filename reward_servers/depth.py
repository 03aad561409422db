"""Depth structural score: Depth Anything V2 (through transformers) on the source and the edit.

score = -mean |d_src - d_edit| over pixels outside the edit mask (all pixels without one), where each
relative depth map d is made scale- and shift-invariant as in MiDaS (Ranftl et al. 2020, eq. 5-6):
d = (D - median(D)) / mean(|D - median(D)|). 0 means identical structure; higher is better.
"""

from __future__ import annotations

import numpy as np

from reward_servers.base import ScoreBatch, ScoreResult, register_scorer
from reward_servers.vision import SquareInputModel, save_tiny_model, score_against_source


def normalise_depth(depth: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Scale-and-shift normalise an (H, W) depth map using the statistics of the `keep` pixels."""
    values = depth[keep] if keep is not None and keep.any() else depth.reshape(-1)
    shift = np.median(values)
    scale = np.mean(np.abs(values - shift))
    return (depth - shift) / max(scale, 1e-8)


@register_scorer("depth_structure")
class DepthStructureScorer(SquareInputModel):
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

        self.load_model(DepthAnythingForDepthEstimation, model_id, device, dtype, input_size, max_batch_size)

    def depth(self, images: list[np.ndarray]) -> np.ndarray:
        """N images -> (N, S, S) float64 relative depth (larger: nearer)."""
        import torch

        with torch.inference_mode():
            pixels = self.preprocess(images).to(self.model.dtype)
            return self.model(pixel_values=pixels).predicted_depth.float().cpu().numpy().astype(np.float64)

    def score(self, batch: ScoreBatch) -> ScoreResult:
        def compare(edit: np.ndarray, source: np.ndarray, keep: np.ndarray | None):
            edit, source = normalise_depth(edit, keep), normalise_depth(source, keep)
            diff = np.abs(edit - source)
            l1 = float(diff[keep].mean()) if keep is not None and keep.any() else float(diff.mean())
            return -l1, {"depth_l1": l1}

        return score_against_source(batch, self.depth, compare)


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
