"""`grounding`: Grounded-SAM's edit region: GroundingDINO finds the phrase's box, SAM turns the box
into a mask (SPIE computes its exemplar term inside this region and its reconstruction term outside).

- Detection (`GroundingDinoForObjectDetection`): the phrase is lower-cased and ends with "." (the
  model's prompt format). A query's confidence is the sigmoid of its largest logit over the phrase's
  tokens (special tokens and "." left out); the best query's box (cx, cy, w, h relative to the image)
  becomes pixels x0, y0, x1, y1. Below `box_threshold` the phrase is not found: the item fails alone.
- Segmentation (`SamModel`): the box is SAM's prompt; the single-mask output, upsampled to the image
  by SAM's own post-processing, is the mask. With `sam_id: ""` the mask is the box itself.

As a scorer (`spie serve grounding`), the score is the box confidence of the phrase (metadata `phrase`,
else the instruction) in the edit; details `box_score`, `x0`, `y0`, `x1`, `y1`. The server's `Ground`
RPC calls `ground(images, phrases)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reward_servers.base import ScoreBatch, ScoreResult, register_scorer
from reward_servers.vision import check_items, load_pretrained


@dataclass
class Grounding:
    """One phrase's region in one image: `mask` (H, W) bool, `box` (x0, y0, x1, y1) pixels, `score`
    the detector's confidence; `error` a one-line reason when the phrase was not found."""

    mask: np.ndarray | None
    box: tuple[float, float, float, float] | None
    score: float
    error: str | None = None


def prompt_text(phrase: str) -> str:
    """GroundingDINO's prompt: lower case, ending with "."."""
    text = phrase.strip().lower()
    return text if text.endswith(".") else text + "."


@register_scorer("grounding")
class GroundingScorer:
    """GroundingDINO + SAM.

    Args:
        model_id: hub id or folder of a `GroundingDinoForObjectDetection` with its processor.
        sam_id: hub id or folder of a `SamModel` with its processor ("" : box masks, no SAM).
        device: torch device.
        dtype: float32, float16 or bfloat16.
        box_threshold: least box confidence for the phrase to count as found.
        max_batch_size: most images per forward pass.
        max_phrase_bytes: longest phrase accepted, in UTF-8 bytes, checked before tokenising.

    An item the models cannot take fails alone with one line (`check`): an image whose short side
    resizes to nothing in either processor, a phrase longer than `max_phrase_bytes` or than the
    text encoder's `max_text_len` tokens.
    """

    name = "grounding"
    version = "1"
    higher_is_better = True

    def __init__(
        self,
        model_id: str = "IDEA-Research/grounding-dino-tiny",
        sam_id: str = "facebook/sam-vit-base",
        device: str = "cpu",
        dtype: str = "float32",
        box_threshold: float = 0.3,
        max_batch_size: int = 8,
        max_phrase_bytes: int = 2048,
    ) -> None:
        from transformers import AutoProcessor, GroundingDinoForObjectDetection

        if not 0 <= box_threshold < 1:
            raise ValueError(f"box_threshold must be in [0, 1), got {box_threshold}")
        if max_phrase_bytes < 1:
            raise ValueError(f"max_phrase_bytes must be >= 1, got {max_phrase_bytes}")
        self.max_phrase_bytes = max_phrase_bytes
        self.detector = load_pretrained(GroundingDinoForObjectDetection, model_id, device, dtype)
        self.detector_processor = AutoProcessor.from_pretrained(model_id)
        self.sam = self.sam_processor = None
        if sam_id:
            from transformers import SamModel, SamProcessor

            self.sam = load_pretrained(SamModel, sam_id, device, dtype)
            self.sam_processor = SamProcessor.from_pretrained(sam_id)
        self.model_id = f"{model_id}+{sam_id}" if sam_id else model_id
        self.device, self.box_threshold, self.max_batch_size = device, box_threshold, max_batch_size

    def check(self, image: np.ndarray, phrase: str) -> str | None:
        """Why the models cannot take this (H, W, 3) image and phrase, in one line; None if they can."""
        h, w = image.shape[:2]
        size = dict(self.detector_processor.image_processor.size)
        short, longest = size.get("shortest_edge"), size.get("longest_edge")
        if short and longest and min(h, w) * longest < max(h, w) * short:
            short = int(round(longest * min(h, w) / max(h, w)))  # transformers' get_size_with_aspect_ratio
        if short is not None and short < 1:
            return (
                f"image {w}x{h}: its short side resizes to 0 px for the detector (aspect ratio too extreme)"
            )
        if self.sam_processor is not None:
            sam_long = dict(self.sam_processor.image_processor.size).get("longest_edge")
            if sam_long and int(min(h, w) * sam_long / max(h, w) + 0.5) < 1:
                return f"image {w}x{h}: its short side resizes to 0 px for SAM (aspect ratio too extreme)"
        size_bytes = len(phrase.encode("utf-8", "surrogatepass"))
        if size_bytes > self.max_phrase_bytes:
            return f"phrase of {size_bytes} bytes exceeds max_phrase_bytes {self.max_phrase_bytes}"
        limit = self.detector.config.max_text_len
        tokens = len(self.detector_processor.tokenizer(prompt_text(phrase))["input_ids"])
        if tokens > limit:
            return f"phrase of {tokens} tokens exceeds the text encoder's limit of {limit} (max_text_len)"
        return None

    def detect(self, images: list[np.ndarray], phrases: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(N, 4) best boxes in pixels (x0, y0, x1, y1) and (N,) their confidences."""
        import torch
        from PIL import Image

        texts = [prompt_text(p) for p in phrases]
        inputs = self.detector_processor(
            images=[Image.fromarray(im) for im in images], text=texts, return_tensors="pt", padding=True
        ).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.detector.dtype)
        with torch.inference_mode():
            out = self.detector(**inputs)
        ids = inputs["input_ids"]  # (N, T)
        tokenizer = self.detector_processor.tokenizer
        skip = set(tokenizer.all_special_ids) | set(tokenizer.convert_tokens_to_ids(["."]))
        phrase_tokens = inputs["attention_mask"].bool() & ~torch.isin(
            ids, torch.tensor(sorted(skip), device=ids.device)
        )
        logits = out.logits.float()[:, :, : ids.shape[1]]  # (N, Q, T)
        probs = logits.sigmoid().masked_fill(~phrase_tokens[:, None, :], 0.0)
        per_query = probs.max(dim=-1).values  # (N, Q)
        best = per_query.argmax(dim=-1)  # (N,)
        scores = per_query.gather(1, best[:, None])[:, 0]
        cxcywh = out.pred_boxes.float()[torch.arange(len(images)), best]  # (N, 4) relative to the image
        sizes = torch.tensor([[im.shape[1], im.shape[0]] * 2 for im in images], dtype=torch.float32)
        half = torch.cat([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], dim=1)
        boxes = (half.cpu() * sizes).clamp(min=torch.zeros(4), max=sizes)
        return boxes.numpy().astype(np.float64), scores.cpu().numpy().astype(np.float64)

    def segment(self, images: list[np.ndarray], boxes: np.ndarray) -> list[np.ndarray]:
        """N (H, W) bool masks, one per (image, box) (the box itself without SAM)."""
        import torch

        if self.sam is None:
            return [box_mask(im.shape[:2], box) for im, box in zip(images, boxes, strict=True)]
        from PIL import Image

        inputs = self.sam_processor(  # PIL images: an (H, W, 3) array with H of 1 or 3 reads as CHW
            images=[Image.fromarray(im) for im in images],
            input_boxes=[[list(map(float, b))] for b in boxes],
            return_tensors="pt",
        )
        with torch.inference_mode():
            out = self.sam(
                pixel_values=inputs["pixel_values"].to(self.device, self.sam.dtype),
                input_boxes=inputs["input_boxes"].to(self.device, torch.float32),
                multimask_output=False,
            )
        masks = self.sam_processor.image_processor.post_process_masks(
            out.pred_masks.float().cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"]
        )
        return [m[0, 0].numpy().astype(bool) for m in masks]

    def ground(self, images: list[np.ndarray], phrases: list[str]) -> list[Grounding]:
        """The region of each phrase in its image (one `Grounding` per item, in order); an item that
        fails `check` gets its reason as the error, and the others are grounded as always."""
        problems = [self.check(im, p) for im, p in zip(images, phrases, strict=True)]
        ok = [i for i, e in enumerate(problems) if e is None]
        out = [Grounding(None, None, float("nan"), e) for e in problems]
        if ok:
            for i, g in zip(ok, self._ground([images[i] for i in ok], [phrases[i] for i in ok]), strict=True):
                out[i] = g
        return out

    def _ground(self, images: list[np.ndarray], phrases: list[str]) -> list[Grounding]:
        boxes, scores = self.detect(images, phrases)
        found = [i for i, s in enumerate(scores) if s >= self.box_threshold]
        masks = (
            dict(zip(found, self.segment([images[i] for i in found], boxes[found]), strict=True))
            if found
            else {}
        )
        out = []
        for i, score in enumerate(scores):
            if i in masks:
                out.append(Grounding(masks[i], tuple(float(v) for v in boxes[i]), float(score)))
            else:
                error = f"phrase {phrases[i]!r} not found (best box score {score:.3f} < box_threshold {self.box_threshold})"
                out.append(Grounding(None, None, float(score), error))
        return out

    def score(self, batch: ScoreBatch) -> ScoreResult:
        phrases = [str(batch.meta(i).get("phrase") or batch.instructions[i]) for i in range(len(batch))]
        errors = check_items(batch, False)
        errors = [e or self.check(batch.edited[i], phrases[i]) for i, e in enumerate(errors)]
        valid = [i for i, e in enumerate(errors) if e is None]
        scores, details = np.full(len(batch), np.nan), [{} for _ in range(len(batch))]
        if valid:
            boxes, found = self.detect([batch.edited[i] for i in valid], [phrases[i] for i in valid])
            for k, i in enumerate(valid):
                scores[i] = float(found[k])
                details[i] = {
                    "box_score": float(found[k]),
                    **dict(zip(("x0", "y0", "x1", "y1"), map(float, boxes[k]), strict=True)),
                }
        return ScoreResult(scores, details, errors)


def box_mask(shape: tuple[int, int], box) -> np.ndarray:
    """(H, W) bool, True on the pixels whose centres lie inside box (x0, y0, x1, y1)."""
    h, w = shape
    ys, xs = np.arange(h)[:, None] + 0.5, np.arange(w)[None, :] + 0.5
    x0, y0, x1, y1 = box
    return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)


def save_tiny(folder: str, seed: int = 0) -> tuple[str, str]:
    """A tiny random GroundingDINO (Swin 8-wide, d_model 32, 8 queries, 64 px) with a word-level BERT
    tokenizer, and a tiny random SAM (ViT 32-wide x 1 layer, 256 px), saved to `folder`/dino and
    `folder`/sam. Returns (model_id, sam_id)."""
    from pathlib import Path

    import torch
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        SamConfig,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
        SwinConfig,
    )
    from transformers.models.grounding_dino import GroundingDinoImageProcessorPil
    from transformers.models.sam import SamImageProcessorPil

    dino, sam = Path(folder) / "dino", Path(folder) / "sam"
    dino.mkdir(parents=True, exist_ok=True)
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        ".",
        "the",
        "a",
        "dog",
        "cat",
        "hat",
        "red",
        "square",
    ]
    (dino / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(dino / "vocab.txt"), do_lower_case=True)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 1, 1],
            window_size=4,
            image_size=64,
            out_features=["stage2", "stage3", "stage4"],
        ),
        text_config=BertConfig(
            vocab_size=len(words),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        ),
        num_queries=8,
        encoder_layers=1,
        decoder_layers=2,  # one layer trips transformers' tying of the per-layer box heads
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        d_model=32,  # GroupNorm(32, d_model) needs a multiple of 32
        num_feature_levels=3,
        encoder_n_points=2,
        decoder_n_points=2,
        max_text_len=16,
        use_timm_backbone=False,
        use_pretrained_backbone=False,
    )
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(config).eval().save_pretrained(dino)
    image_processor = GroundingDinoImageProcessorPil(size={"shortest_edge": 64, "longest_edge": 64})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(dino)
    sam_config = SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            mlp_dim=64,
            image_size=256,  # low-res masks of 64 x 64: about one source pixel each at test sizes
            patch_size=16,
            output_channels=16,
            window_size=2,
            global_attn_indexes=[0],
            num_pos_feats=8,
        ),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=16, image_size=256, patch_size=16, mask_input_channels=4
        ),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32, iou_head_hidden_dim=16
        ),
    )
    torch.manual_seed(seed + 1)
    SamModel(sam_config).eval().save_pretrained(sam)
    sam_images = SamImageProcessorPil(size={"longest_edge": 256}, pad_size={"height": 256, "width": 256})
    SamProcessor(image_processor=sam_images).save_pretrained(sam)
    return str(dino), str(sam)
