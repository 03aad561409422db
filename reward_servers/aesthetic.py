"""Aesthetic score: the LAION aesthetic predictor v2, an MLP on CLIP ViT-L/14 image embeddings.

The MLP follows christophschuhmann/improved-aesthetic-predictor (`simple_inference.py`): the image
embedding is L2-normalised, then Linear(768, 1024) -> Dropout -> Linear(1024, 128) -> Dropout ->
Linear(128, 64) -> Dropout -> Linear(64, 16) -> Linear(16, 1), no activations. Its checkpoint
(`sac+logos+ava1-l14-linearMSE.pth`, keys `layers.{0,2,4,6,7}.{weight,bias}`) is loaded with
`torch.load(weights_only=True)` (tensors only, no code) or from a .safetensors file. Rewritten here
on transformers' CLIPVisionModelWithProjection instead of the `clip` package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reward_servers.base import ScoreBatch, ScoreResult, register_scorer
from reward_servers.vision import (
    CLIP_MEAN,
    CLIP_STD,
    load_pretrained,
    preprocess_differentiable,
    resize_short_center_crop,
    score_valid,
    to_tensor,
)


def build_mlp(embed_dim: int):
    """The aesthetic head, as an nn.Sequential named `layers` would be (indices 0, 2, 4, 6, 7 are Linear)."""
    from torch import nn

    return nn.Sequential(
        nn.Linear(embed_dim, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )


def load_mlp_state(path: str | Path) -> dict:
    """Read the MLP weights (.pth via torch.load(weights_only=True), or .safetensors), keys without
    the `layers.` prefix."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic mlp_path: no such file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("layers."): v for k, v in state.items()}


@register_scorer("aesthetic")
class AestheticScorer:
    """LAION aesthetic predictor v2 on the edited image (about 1-10; higher is prettier).

    Args:
        model_id: hub id or local folder of a CLIPVisionModelWithProjection (ViT-L/14 for the real MLP).
        mlp_path: the MLP weights (.pth or .safetensors); a relative path is looked up inside
            `model_id` when that is a local folder.
        device: torch device.
        dtype: float32, float16 or bfloat16 (the MLP always runs in float32).
        max_batch_size: most images per forward pass.
    """

    name = "aesthetic"
    version = "1"
    higher_is_better = True

    def __init__(
        self,
        model_id: str = "openai/clip-vit-large-patch14",
        mlp_path: str = "sac+logos+ava1-l14-linearMSE.pth",
        device: str = "cpu",
        dtype: str = "float32",
        max_batch_size: int = 32,
    ) -> None:
        from transformers import CLIPVisionModelWithProjection

        self.model = load_pretrained(CLIPVisionModelWithProjection, model_id, device, dtype)
        path = Path(mlp_path)
        if not path.is_absolute() and not path.is_file() and Path(model_id).is_dir():
            path = Path(model_id) / mlp_path
        self.mlp = build_mlp(self.model.config.projection_dim)
        self.mlp.load_state_dict(load_mlp_state(path))
        self.mlp = self.mlp.to(device).eval().requires_grad_(False)
        self.model.requires_grad_(False)  # frozen: gradients flow to the images only
        self.model_id, self.device = model_id, device
        self.image_size = int(self.model.config.image_size)
        self.max_batch_size = max_batch_size

    def preprocess(self, images: list[np.ndarray]):
        """N (H, W, 3) uint8 -> (N, 3, S, S): short side to S (bicubic), centre crop, CLIP normalisation."""
        crops = [resize_short_center_crop(im, self.image_size) for im in images]
        return to_tensor(crops, CLIP_MEAN, CLIP_STD, self.device)

    def score(self, batch: ScoreBatch) -> ScoreResult:
        import torch

        def run(valid: list[int]):
            with torch.inference_mode():
                pixels = self.preprocess([batch.edited[i] for i in valid]).to(self.model.dtype)
                embeds = self.model(pixel_values=pixels).image_embeds.float()
                embeds = embeds / embeds.norm(dim=-1, keepdim=True)
                scores = self.mlp(embeds).squeeze(-1).cpu().numpy()
            return scores, [{} for _ in valid]

        return score_valid(batch, False, run)

    def score_differentiable(self, images, batch: ScoreBatch):
        """(B, 3, H, W) edits in [0, 1] -> (B,) aesthetic scores, differentiable (AlignProp's
        `aesthetic_loss_fn` without its sign: torch resize and CLIP normalisation, the frozen CLIP
        tower, the MLP)."""
        pixels = preprocess_differentiable(images.to(self.device), self.image_size, CLIP_MEAN, CLIP_STD)
        embeds = self.model(pixel_values=pixels.to(self.model.dtype)).image_embeds.float()
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        return self.mlp(embeds).squeeze(-1)


def save_tiny(folder: str, seed: int = 0) -> str:
    """A tiny random CLIP vision tower (hidden 32, 2 layers, 32 px, projection 16) plus a random MLP
    saved as `folder/aesthetic_mlp.safetensors`."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from reward_servers.vision import save_tiny_model

    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        projection_dim=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    save_tiny_model(CLIPVisionModelWithProjection, config, folder, seed)
    torch.manual_seed(seed + 1)
    mlp = build_mlp(16)
    save_file(
        {f"layers.{k}": v.contiguous() for k, v in mlp.state_dict().items()},
        f"{folder}/aesthetic_mlp.safetensors",
    )
    return folder
