"""SPIE's exemplar semantic score: DINOv2 patch features of the edit, inside the edit mask, compared
with the patch features of the exemplar images, plus a reconstruction term outside the mask.

For item i with edit-mask patches M (all patches without a mask) and exemplars e_1..e_K:

    semantic = mean over p in M of  max over k, q of  cos(f_edit[p], f_{e_k}[q])
    score    = semantic - rec_lambda * MSE(edit, source) over pixels outside the mask

Each edited patch is matched to its nearest exemplar patch, so the score rises when the edited
region looks like the exemplars (the target concept) wherever it sits in them; the reconstruction
term keeps the rest of the image unchanged (SPIE, arXiv 2504.12833). Masks come from the request.
"""

from __future__ import annotations

import numpy as np

from reward_servers.base import ScoreBatch, ScoreResult, register_scorer
from reward_servers.vision import SquareInputModel, resize_mask, save_tiny_model, score_valid


@register_scorer("exemplar_semantic")
class ExemplarSemanticScorer(SquareInputModel):
    """Nearest-exemplar-patch cosine similarity inside the mask, minus rec_lambda x MSE outside.

    Args:
        model_id: hub id or local folder of a Dinov2Model checkpoint.
        device: torch device.
        dtype: float32, float16 or bfloat16.
        input_size: side of the square model input (a multiple of the patch size, 14).
        rec_lambda: weight of the reconstruction MSE outside the edit mask (pixels in [0, 1]).
        max_batch_size: most items per call.
    """

    name = "exemplar_semantic"
    version = "1"
    higher_is_better = True

    def __init__(
        self,
        model_id: str = "facebook/dinov2-small",
        device: str = "cpu",
        dtype: str = "float32",
        input_size: int = 224,
        rec_lambda: float = 1.0,
        max_batch_size: int = 16,
    ) -> None:
        from transformers import Dinov2Model

        self.load_model(Dinov2Model, model_id, device, dtype, input_size, max_batch_size)
        self.patch = int(self.model.config.patch_size)
        self.rec_lambda = rec_lambda

    @property
    def grid(self) -> int:
        return self.input_size // self.patch

    def patch_features(self, images: list[np.ndarray]):
        """N images -> (N, G*G, D) L2-normalised patch features (CLS token dropped), G = S / 14."""
        import torch

        with torch.inference_mode():
            hidden = self.model(pixel_values=self.preprocess(images).to(self.model.dtype)).last_hidden_state
            feats = hidden[:, 1 : 1 + self.grid * self.grid].float()
            return feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    def score(self, batch: ScoreBatch) -> ScoreResult:
        errors = [
            None if len(batch.exemplar_list(i)) else "needs at least one exemplar image"
            for i in range(len(batch))
        ]

        def run(valid: list[int]):
            todo = [i for i in valid if errors[i] is None]
            exemplars = [ex for i in todo for ex in batch.exemplar_list(i)]
            feats = self.patch_features([batch.edited[i] for i in todo] + exemplars)
            out_scores, out_details, offset = {}, {}, len(todo)
            for k, i in enumerate(todo):
                n_ex = len(batch.exemplar_list(i))
                ex_feats = feats[offset : offset + n_ex].reshape(-1, feats.shape[-1])
                offset += n_ex
                mask = batch.mask(i)
                inside = np.ones(self.grid * self.grid, bool)
                if mask is not None:
                    patch_mask = resize_mask(mask, (self.grid, self.grid)).reshape(-1)
                    inside = patch_mask if patch_mask.any() else inside
                sims = feats[k][inside] @ ex_feats.T  # (P_in, K * G * G)
                semantic = float(sims.max(dim=1).values.mean())
                edit, source = batch.edited[i] / 255.0, batch.sources[i] / 255.0
                keep = np.ones(edit.shape[:2], bool) if mask is None else ~mask
                mse = float(((edit - source) ** 2)[keep].mean()) if keep.any() else 0.0
                out_scores[i] = semantic - self.rec_lambda * mse
                out_details[i] = {"semantic": semantic, "mse_outside": mse}
            return [out_scores.get(i, np.nan) for i in valid], [out_details.get(i, {}) for i in valid]

        result = score_valid(batch, True, run)
        for i, error in enumerate(errors):
            if error is not None and result.errors[i] is None:
                result.errors[i], result.scores[i] = error, np.nan
        return result


def save_tiny(folder: str, seed: int = 0) -> str:
    """A tiny random DINOv2 (hidden 32, 2 layers, patch 14) saved to `folder`; use input_size=56."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=56, patch_size=14
    )
    return save_tiny_model(Dinov2Model, config, folder, seed)
