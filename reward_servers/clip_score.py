"""`clip`: CLIP text-image, image-image and directional similarity, as one registered scorer.

Per item (transformers `CLIPModel`, a local folder or a hub id; each image's short side resized to
the model's input size, then centre-cropped, with CLIP's mean and std):

- `clip_text_image`: cos(E(edit), T(target)), the target being the item's `target_caption`
  (metadata) or else its instruction;
- `clip_image`: cos(E(edit), E(source));
- `clip_direction`: the directional similarity of Gal et al. (StyleGAN-NADA) that InstructPix2Pix
  reports: cos(E(edit) - E(source), T(target_caption) - T(source_caption)) when the metadata has both
  captions, else cos(E(edit) - E(source), T(instruction)).

The score is the detail named by `score` (default `clip_direction`), so the same scorer serves
evaluation (every detail), training (one number) and a reward server.
"""

from __future__ import annotations

import numpy as np

from reward_servers.base import ScoreBatch, ScoreResult, register_scorer
from reward_servers.vision import (
    CLIP_MEAN,
    CLIP_STD,
    load_pretrained,
    resize_short_center_crop,
    score_valid,
    to_tensor,
)

KEYS = ("clip_text_image", "clip_image", "clip_direction")


@register_scorer("clip")
class ClipScorer:
    """CLIP similarities of (edit, source, instruction / captions).

    Args:
        model_id: hub id or local folder holding a `CLIPModel` and its tokenizer.
        device: torch device.
        dtype: float32, float16 or bfloat16.
        score: which similarity is the score: clip_direction, clip_text_image or clip_image.
        max_batch_size: most items per forward pass.
    """

    name = "clip"
    version = "1"
    higher_is_better = True

    def __init__(
        self,
        model_id: str = "openai/clip-vit-large-patch14",
        device: str = "cpu",
        dtype: str = "float32",
        score: str = "clip_direction",
        max_batch_size: int = 32,
    ) -> None:
        from transformers import CLIPModel, CLIPTokenizer

        if score not in KEYS:
            raise ValueError(f"score must be one of {list(KEYS)}, got {score!r}")
        self.model = load_pretrained(CLIPModel, model_id, device, dtype)
        self.tokenizer = CLIPTokenizer.from_pretrained(model_id)
        self.image_size = int(self.model.config.vision_config.image_size)
        self.model_id, self.device, self.key = model_id, device, score
        self.max_batch_size = max_batch_size

    def embed_images(self, images: list[np.ndarray]):
        """N (H, W, 3) uint8 images -> (N, P) float32 unit embeddings."""
        import torch

        crops = [resize_short_center_crop(im, self.image_size) for im in images]
        pixels = to_tensor(crops, CLIP_MEAN, CLIP_STD, self.device).to(self.model.dtype)
        with torch.inference_mode():
            return _unit(_features(self.model.get_image_features(pixel_values=pixels)))

    def embed_texts(self, texts: list[str]):
        """N strings -> (N, P) float32 unit embeddings (padded to the tokenizer's full length, so an
        item's embedding does not depend on its batch)."""
        import torch

        tok = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode():
            return _unit(_features(self.model.get_text_features(**tok)))

    def similarities(self, batch: ScoreBatch, valid: list[int]) -> dict[str, np.ndarray]:
        """{key: (len(valid),) float64} for the items `valid` of `batch`."""
        import torch

        meta = [batch.meta(i) for i in valid]
        instructions = [batch.instructions[i] for i in valid]
        e = self.embed_images([batch.edited[i] for i in valid])
        s = self.embed_images([batch.sources[i] for i in valid])
        target = [m.get("target_caption") or ins for m, ins in zip(meta, instructions, strict=True)]
        captions = torch.tensor(
            [bool(m.get("source_caption") and m.get("target_caption")) for m in meta], device=e.device
        )
        t_target = self.embed_texts(target)
        t_source = self.embed_texts([m.get("source_caption") or "" for m in meta])
        t_instr = self.embed_texts(instructions)
        text_dir = torch.where(captions[:, None], t_target - t_source, t_instr)

        def cos(a, b) -> np.ndarray:
            c = torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-8)
            return c.double().clamp(-1, 1).cpu().numpy()  # rounding may step past +-1

        return {
            "clip_text_image": cos(e, t_target),
            "clip_image": cos(e, s),
            "clip_direction": cos(e - s, text_dir),
        }

    def score(self, batch: ScoreBatch) -> ScoreResult:
        def run(valid: list[int]):
            sims = self.similarities(batch, valid)
            details = [{k: float(sims[k][j]) for k in KEYS} for j in range(len(valid))]
            return sims[self.key], details

        return score_valid(batch, False, run)


def _features(out):
    """`get_*_features` returns a tensor (transformers 4) or an output with `pooler_output` (5)."""
    import torch

    return out if torch.is_tensor(out) else out.pooler_output


def _unit(x):
    return (x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)).float()


def save_tiny(folder: str, seed: int = 0) -> str:
    """A tiny random CLIP (text and vision hidden 32 x 2 layers, 32 px, projection 16) with a
    byte-level CLIP tokenizer (the 256 bytes and their end-of-word forms), saved to `folder`."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from reward_servers.vision import save_tiny_model

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    # GPT-2 / CLIP byte-level stand-ins: printable bytes keep their character, the others map above 255.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    alphabet = [chr(b) for b in printable] + [chr(256 + k) for k in range(256 - len(printable))]
    vocab.update({ch: 2 + k for k, ch in enumerate(alphabet)})
    vocab.update({ch + "</w>": 2 + len(alphabet) + k for k, ch in enumerate(alphabet)})
    text = {
        "vocab_size": len(vocab),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 32,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 32,
        "patch_size": 8,
    }
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    save_tiny_model(CLIPModel, config, folder, seed)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=32).save_pretrained(folder)
    return folder
