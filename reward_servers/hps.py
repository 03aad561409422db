"""HPSv2 human-preference score: open_clip ViT-H-14 fine-tuned on HPD v2 (Wu et al. 2023).

score = 100 * cos(image embedding of the edit, text embedding of the instruction), as in the `hpsv2`
package's `score()`; rewritten on open_clip directly. open_clip (and the torchvision it pulls) is
the optional extra `pip install -e ".[hps]"`; it is imported only when the scorer is built.
"""

from __future__ import annotations

from pathlib import Path

from reward_servers.base import ScoreBatch, ScoreResult, register_scorer
from reward_servers.vision import CLIP_MEAN, CLIP_STD, preprocess_differentiable, score_valid


@register_scorer("hpsv2")
class HpsV2Scorer:
    """HPSv2 on (edit, instruction).

    Args:
        checkpoint: path of `HPS_v2_compressed.pt` (or HPS_v2.1), a state dict loaded with
            torch.load(weights_only=True).
        architecture: open_clip model name.
        device: torch device.
        max_batch_size: most images per forward pass.
    """

    name = "hpsv2"
    version = "1"
    higher_is_better = True

    def __init__(
        self,
        checkpoint: str = "HPS_v2_compressed.pt",
        architecture: str = "ViT-H-14",
        device: str = "cpu",
        max_batch_size: int = 16,
    ) -> None:
        import torch

        try:
            import open_clip
        except ImportError as err:
            raise ImportError('the hpsv2 scorer needs open_clip: pip install -e ".[hps]"') from err
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"hpsv2 checkpoint: no such file {checkpoint}")
        model, _, preprocess = open_clip.create_model_and_transforms(
            architecture, pretrained=None, device=device
        )
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state))
        self.model, self.preprocess = model.eval().requires_grad_(False), preprocess
        self.tokenizer = open_clip.get_tokenizer(architecture)
        self.model_id, self.device, self.max_batch_size = checkpoint, device, max_batch_size

    def score(self, batch: ScoreBatch) -> ScoreResult:
        import torch
        from PIL import Image

        def run(valid: list[int]):
            pixels = torch.stack([self.preprocess(Image.fromarray(batch.edited[i])) for i in valid]).to(
                self.device
            )
            text = self.tokenizer([batch.instructions[i] for i in valid]).to(self.device)
            with torch.inference_mode():
                image_feats = self.model.encode_image(pixels, normalize=True)
                text_feats = self.model.encode_text(text, normalize=True)
                scores = 100.0 * (image_feats * text_feats).sum(-1)
            return scores.float().cpu().numpy(), [{} for _ in valid]

        return score_valid(batch, False, run)

    def score_differentiable(self, images, batch: ScoreBatch):
        """(B, 3, H, W) edits in [0, 1] -> (B,) HPSv2 scores, differentiable (AlignProp's
        `hps_loss_fn` as a score: torch resize to the tower's size, CLIP normalisation)."""
        import torch

        side = self.model.visual.image_size
        side = side[0] if isinstance(side, tuple | list) else int(side)
        pixels = preprocess_differentiable(images.to(self.device), side, CLIP_MEAN, CLIP_STD)
        image_feats = self.model.encode_image(pixels, normalize=True)
        with torch.no_grad():
            text = self.tokenizer(list(batch.instructions)).to(self.device)
            text_feats = self.model.encode_text(text, normalize=True)
        return 100.0 * (image_feats.float() * text_feats.float()).sum(-1)
