"""VLM semantic judge: a Qwen2-VL-family model is shown the source and the edit and asked whether the
edit follows the instruction. The score is P("Yes") for the first answer token, read from the
logits of one batched forward pass (no generation).

The prompt is Qwen's chat format, written out here so any Qwen2-VL / Qwen2.5-VL checkpoint works:

    <|im_start|>user
    <|vision_start|><|image_pad|>...<|vision_end|><|vision_start|><|image_pad|>...<|vision_end|>{question}<|im_end|>
    <|im_start|>assistant

Each image's `<|image_pad|>` run has grid_t * grid_h * grid_w / merge_size^2 tokens, as the
checkpoint's own image processor computes (the same expansion Qwen2VLProcessor does). Prompts are
padded on the left, so the last position is every item's answer slot.
"""

from __future__ import annotations

import numpy as np

from reward_servers.base import ScoreBatch, ScoreResult, register_scorer
from reward_servers.vision import score_valid, torch_dtype

DEFAULT_QUESTION = (
    "The first image is the original and the second image is an edited version of it. "
    'The edit instruction was: "{instruction}". Does the second image follow the instruction '
    "while keeping the rest of the original unchanged? Answer Yes or No."
)
SPECIAL_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


@register_scorer("vlm_judge")
class VlmJudgeScorer:
    """P("Yes") from a Qwen2-VL-family model asked whether the edit follows the instruction.

    Args:
        model_id: hub id or local folder holding the model, its tokenizer and image processor.
        device: torch device.
        dtype: float32, float16 or bfloat16.
        question: the question, with `{instruction}` where the instruction goes.
        yes_token / no_token: the answer words; their first tokens are read from the logits.
        normalize_yes_no: score P(Yes) / (P(Yes) + P(No)) instead of P(Yes) over the whole vocabulary.
        min_pixels / max_pixels: image size bounds passed to the image processor (None: its own).
        max_batch_size: most items per forward pass.
    """

    name = "vlm_judge"
    version = "1"
    higher_is_better = True

    def __init__(
        self,
        model_id: str = "Qwen/Qwen2-VL-2B-Instruct",
        device: str = "cpu",
        dtype: str = "float32",
        question: str = DEFAULT_QUESTION,
        yes_token: str = "Yes",
        no_token: str = "No",
        normalize_yes_no: bool = False,
        min_pixels: int | None = None,
        max_pixels: int | None = 448 * 448,
        max_batch_size: int = 8,
    ) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        self.model = (
            AutoModelForImageTextToText.from_pretrained(model_id, dtype=torch_dtype(dtype)).to(device).eval()
        )
        self.tokenizer = AutoTokenizer.from_pretrained(model_id, padding_side="left")
        self.image_processor = AutoImageProcessor.from_pretrained(model_id)
        if "{instruction}" not in question:
            raise ValueError("question must contain '{instruction}'")
        self.yes_id = self._first_token(yes_token, "yes_token")
        self.no_id = self._first_token(no_token, "no_token")
        self.image_kwargs = {
            k: v for k, v in {"min_pixels": min_pixels, "max_pixels": max_pixels}.items() if v
        }
        self.model_id, self.device, self.question = model_id, device, question
        self.normalize_yes_no = normalize_yes_no
        self.max_batch_size = max_batch_size

    def _first_token(self, word: str, field: str) -> int:
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        if not ids or ids[0] == self.tokenizer.unk_token_id:
            raise ValueError(f"{field} {word!r} is not in the tokenizer's vocabulary")
        return ids[0]

    def build_inputs(self, sources: list[np.ndarray], edits: list[np.ndarray], instructions: list[str]):
        """Tokenised prompts and pixel patches for N (source, edit) pairs.

        Returns a dict with input_ids, attention_mask and mm_token_type_ids (N, L), pixel_values (total patches, C*T*P*P)
        and image_grid_thw (2N, 3), images in the order source_0, edit_0, source_1, ...
        """
        from PIL import Image

        images = [Image.fromarray(im) for pair in zip(sources, edits, strict=True) for im in pair]
        vision = self.image_processor(images=images, return_tensors="pt", **self.image_kwargs)
        merge = self.image_processor.merge_size**2
        counts = (vision["image_grid_thw"].prod(-1) // merge).tolist()
        texts = []
        for k, instruction in enumerate(instructions):
            blocks = "".join(
                f"<|vision_start|>{'<|image_pad|>' * counts[2 * k + j]}<|vision_end|>" for j in (0, 1)
            )
            question = self.question.format(instruction=instruction)
            texts.append(f"<|im_start|>user\n{blocks}{question}<|im_end|>\n<|im_start|>assistant\n")
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        # 1 marks image tokens for multimodal RoPE (what Qwen2VLProcessor returns as mm_token_type_ids).
        image_id = self.model.config.image_token_id
        mm_types = (tokens["input_ids"] == image_id).to(tokens["input_ids"].dtype)
        return {**tokens, "mm_token_type_ids": mm_types, **vision}

    def score(self, batch: ScoreBatch) -> ScoreResult:
        import torch

        def run(valid: list[int]):
            inputs = self.build_inputs(
                [batch.sources[i] for i in valid],
                [batch.edited[i] for i in valid],
                [batch.instructions[i] for i in valid],
            )
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
            with torch.inference_mode():
                logits = self.model(**inputs, use_cache=False).logits[:, -1, :].float()
            logp = torch.log_softmax(logits, dim=-1)
            p_yes, p_no = logp[:, self.yes_id].exp(), logp[:, self.no_id].exp()
            p_norm = p_yes / (p_yes + p_no).clamp_min(1e-12)
            scores = (p_norm if self.normalize_yes_no else p_yes).cpu().numpy()
            details = [
                {"p_yes": float(y), "p_no": float(n)}
                for y, n in zip(p_yes.tolist(), p_no.tolist(), strict=True)
            ]
            return scores, details

        return score_valid(batch, False, run)


def save_tiny(folder: str, seed: int = 0) -> str:
    """A tiny random Qwen2-VL (text hidden 32 x 2 layers, vision 32 x 1 layer), a word-level tokenizer
    with Qwen's special tokens, and a Qwen2-VL image processor fixed at 56 x 56, saved to `folder`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    words = ["<unk>", "<|endoftext|>", *SPECIAL_TOKENS, "Yes", "No", "user", "assistant"]
    words += sorted(set(DEFAULT_QUESTION.replace(".", " . ").replace('"', ' " ').replace("?", " ? ").split()))
    words += ["make", "it", "snowy", "add", "a", "hat", "keep", "red", "blue", "sky", "\n", ":", "{", "}"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": None,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2},
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56).save_pretrained(folder)
    return folder
