"""VLM judge: a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model is shown the source and the edit through its
own chat template and asked about the edit. Every score is read from the logits of one batched
forward pass (no generation, nothing parsed from text). Three modes:

- `yes_no`: P("Yes") at the answer position (optionally normalised against P("No")).
- `rating`: the expected rating over the tokens "0".."max_rating" (Edit-R1 / UniWorld-V2), divided
  by max_rating: a score in [0, 1]; details `rating` (0..max_rating) and `label_mass`.
- `viescore`: VIEScore as GEdit-Bench uses it (TIGER-AI-Lab/VIEScore `viescore/__init__.py`,
  `evaluate`): semantic consistency sc = min of its 0-10 ratings (edit success, no over-editing,
  both images shown), perceptual quality pq = min of its 0-10 ratings (naturalness, no artifacts,
  the edit alone), score sqrt(sc * pq) in [0, 10]; details `sc`, `pq` and each rating.
- `editscore`: EditScore's generative scoring (VectorSpaceLab/EditScore, `editscore.py`): the judge
  reasons first (greedy generation, at most `max_new_tokens`), then each score is the expected label
  over 0..score_range read from the logits after a fixed score prefix; SC and PQ as in VIEScore,
  rescaled to 0-10, score sqrt(SC * PQ) in [0, 10]; the reasoning in `ScoreResult.texts`.
  EditScore's released checkpoints are LoRA adapters: `model_id` is the base and `lora_path` the
  adapter, merged at load with peft: `Qwen/Qwen2.5-VL-7B-Instruct` + `EditScore/EditScore-7B`,
  `Qwen/Qwen3-VL-4B-Instruct` + `EditScore/EditScore-Qwen3-VL-4B-Instruct` (and the 8B alike),
  score_range 25. The larger ones (`EditScore/EditScore-72B`) load the same way.

The questions live in `prompts/vlm_judge.yaml` (or `prompts_path`); its version travels in the
scorer's version string (Info) and in each result's details (`prompt_version`). Each image's
`<|image_pad|>` is expanded to grid_t * grid_h * grid_w / merge_size^2 tokens, as the checkpoint's
processor does. Prompts are padded on the left, so the last position is every row's answer slot.
"""

from __future__ import annotations

import math

import numpy as np

from reward_servers.base import ScoreBatch, ScoreResult, register_scorer
from reward_servers.vision import score_valid, torch_dtype
from reward_servers.vlm_prompts import (
    MAX_INSTRUCTION_BYTES,
    MAX_INSTRUCTION_TOKENS,
    PromptSet,
    Question,
    RatingReader,
    check_limits,
    instruction_problem,
    load_prompts,
    render,
)

LOGIC_VERSION = "2"


@register_scorer("vlm_judge")
class VlmJudgeScorer:
    """A Qwen-VL-family judge of (source, edit, instruction).

    Args:
        model_id: hub id or local folder holding the model, its tokenizer (with a chat template)
            and image processor.
        mode: "yes_no", "rating" or "viescore" (see the module docstring).
        device: torch device.
        dtype: float32, float16 or bfloat16.
        prompts_path: the prompt file ("" : the shipped `prompts/vlm_judge.yaml`).
        question: yes_no mode only: replaces the file's question ({instruction} where it goes).
        yes_token / no_token: yes_no mode: the answer words; their first tokens are read.
        normalize_yes_no: yes_no mode: P(Yes) / (P(Yes) + P(No)) instead of P(Yes).
        max_rating: rating mode: the top of the scale (viescore always rates 0-10).
        min_pixels / max_pixels: image size bounds passed to the image processor (None: its own).
        max_batch_size: most items per forward pass (viescore puts 4 rows per item in it).
        score_range: editscore mode: the top of each score's scale (EditScore's checkpoints: 25).
        max_new_tokens: editscore mode: most reasoning tokens generated per question.
        lora_path: a LoRA adapter (hub id or folder) merged into the model at load ("" : none).
        max_instruction_bytes: longest instruction accepted, in UTF-8 bytes, checked before
            tokenising; a longer one fails its item alone, in one line.
        max_instruction_tokens: most tokens of the instruction in a prompt; more fails the item
            alone (a 64 KiB instruction once took the tiny EditScore judge 154 s and 16 GB).
    """

    name = "vlm_judge"
    higher_is_better = True

    def __init__(
        self,
        model_id: str = "Qwen/Qwen2-VL-2B-Instruct",
        mode: str = "yes_no",
        device: str = "cpu",
        dtype: str = "float32",
        prompts_path: str = "",
        question: str = "",
        yes_token: str = "Yes",
        no_token: str = "No",
        normalize_yes_no: bool = False,
        max_rating: int = 5,
        min_pixels: int | None = None,
        max_pixels: int | None = 448 * 448,
        max_batch_size: int = 8,
        score_range: int = 25,
        max_new_tokens: int = 256,
        lora_path: str = "",
        max_instruction_bytes: int = MAX_INSTRUCTION_BYTES,
        max_instruction_tokens: int = MAX_INSTRUCTION_TOKENS,
    ) -> None:
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        check_limits(max_instruction_bytes, max_instruction_tokens, "vlm_judge")
        self.max_instruction_bytes, self.max_instruction_tokens = (
            max_instruction_bytes,
            max_instruction_tokens,
        )

        if mode == "editscore":
            from reward_servers.editscore import DigitReader, load_editscore_prompts

            self.prompts = load_editscore_prompts(prompts_path or None)
        else:
            self.prompts: PromptSet = load_prompts(mode, prompts_path or None)
        if question:
            if mode != "yes_no" or "{instruction}" not in question:
                raise ValueError("question is for mode yes_no and must contain '{instruction}'")
            q = self.prompts.questions[0]
            self.prompts = PromptSet(self.prompts.version, mode, (Question(q.key, q.images, question),), {})
        self.model = (
            AutoModelForImageTextToText.from_pretrained(model_id, dtype=torch_dtype(dtype)).to(device).eval()
        )
        if lora_path:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, lora_path).merge_and_unload().eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_id, padding_side="left")
        if not self.tokenizer.chat_template:
            from transformers import AutoProcessor

            self.tokenizer.chat_template = getattr(
                AutoProcessor.from_pretrained(model_id), "chat_template", None
            )
        if not self.tokenizer.chat_template:
            raise ValueError(f"model_id {model_id!r} has no chat template (tokenizer or processor)")
        self.image_processor = AutoImageProcessor.from_pretrained(model_id)
        self.mode = mode
        self.max_rating = {"viescore": 10, "editscore": score_range}.get(mode, max_rating)
        if mode == "editscore":
            if max_new_tokens < 1:
                raise ValueError(f"vlm_judge: max_new_tokens must be >= 1, got {max_new_tokens}")
            self.reader = DigitReader(self.tokenizer, score_range)
        else:
            self.reader = RatingReader(self.tokenizer, self.max_rating) if mode != "yes_no" else None
        self.max_new_tokens = max_new_tokens
        self.yes_id = self._first_token(yes_token, "yes_token")
        self.no_id = self._first_token(no_token, "no_token")
        self.image_kwargs = {
            k: v for k, v in {"min_pixels": min_pixels, "max_pixels": max_pixels}.items() if v
        }
        self.model_id, self.device = model_id, device
        self.normalize_yes_no = normalize_yes_no
        self.max_batch_size = max_batch_size
        self.version = f"{LOGIC_VERSION}-{mode}-prompts{self.prompts.version}"
        self.model_id = f"{model_id}+{lora_path}" if lora_path else model_id

    def _first_token(self, word: str, field: str) -> int:
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        if not ids or ids[0] == self.tokenizer.unk_token_id:
            raise ValueError(f"{field} {word!r} is not in the tokenizer's vocabulary")
        return ids[0]

    def check_instruction(self, instruction: str) -> str | None:
        """Why this instruction is too long for a prompt, in one line; None when it fits."""
        return instruction_problem(
            self.tokenizer, instruction, self.max_instruction_bytes, self.max_instruction_tokens
        )

    def build_inputs(self, sources: list[np.ndarray], edits: list[np.ndarray], instructions: list[str]):
        """Tokenised prompts and pixel patches for N items x Q questions (R = N * Q rows, item-major).

        Returns a dict with input_ids, attention_mask and mm_token_type_ids (R, L), pixel_values
        (total patches, C*T*P*P) and image_grid_thw (images, 3), images in row order. When ratings
        need a second token (0-10 scales), it is appended after every row's answer slot.
        """
        import torch
        from PIL import Image

        rows = [(k, q) for k in range(len(instructions)) for q in self.prompts.questions]
        images = [
            Image.fromarray(sources[k] if role == "source" else edits[k])
            for k, q in rows
            for role in q.images
        ]
        vision = self.image_processor(images=images, return_tensors="pt", **self.image_kwargs)
        merge = self.image_processor.merge_size**2
        counts = (vision["image_grid_thw"].prod(-1) // merge).tolist()
        texts, start = [], 0
        for k, q in rows:
            n = len(q.images)
            texts.append(
                render(
                    self.tokenizer, q, instructions[k], counts[start : start + n], max_rating=self.max_rating
                )
            )
            start += n
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        if self.reader is not None and self.reader.prefix is not None:
            column = torch.full((len(rows), 1), self.reader.prefix, dtype=tokens["input_ids"].dtype)
            tokens["input_ids"] = torch.cat([tokens["input_ids"], column], dim=1)
            tokens["attention_mask"] = torch.cat([tokens["attention_mask"], torch.ones_like(column)], dim=1)
        # 1 marks image tokens for multimodal RoPE (what the Qwen-VL processors return).
        mm_types = (tokens["input_ids"] == self.model.config.image_token_id).to(tokens["input_ids"].dtype)
        return {**tokens, "mm_token_type_ids": mm_types, **vision}

    def _forward(self, inputs):
        """(R, V) answer-slot logits and (R, V) logits after the appended token (or None)."""
        import torch

        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            logits = self.model(**inputs, use_cache=False).logits
        if self.reader is not None and self.reader.prefix is not None:
            return logits[:, -2, :].float(), logits[:, -1, :].float()
        return logits[:, -1, :].float(), None

    def _read(self, answer, following, n: int) -> tuple[list[float], list[dict[str, float]]]:
        import torch

        version = float(self.prompts.version)
        if self.mode == "yes_no":
            logp = torch.log_softmax(answer, dim=-1)
            p_yes, p_no = logp[:, self.yes_id].exp(), logp[:, self.no_id].exp()
            scores = p_yes / (p_yes + p_no).clamp_min(1e-12) if self.normalize_yes_no else p_yes
            details = [
                {"p_yes": float(y), "p_no": float(m), "prompt_version": version}
                for y, m in zip(p_yes.tolist(), p_no.tolist(), strict=True)
            ]
            return scores.tolist(), details
        ratings, mass = self.reader.expected(answer, following)
        q = len(self.prompts.questions)
        ratings, mass = ratings.view(n, q).tolist(), mass.view(n, q).tolist()
        if self.mode == "rating":
            details = [
                {"rating": r[0], "label_mass": m[0], "prompt_version": version}
                for r, m in zip(ratings, mass, strict=True)
            ]
            return [r[0] / self.max_rating for r in ratings], details
        keys = [question.key for question in self.prompts.questions]
        scores, details = [], []
        for row in ratings:
            by_key = dict(zip(keys, row, strict=True))
            sc = min(by_key[k] for k in self.prompts.groups["sc"])
            pq = min(by_key[k] for k in self.prompts.groups["pq"])
            scores.append(math.sqrt(max(sc, 0.0) * max(pq, 0.0)))
            details.append({**by_key, "sc": sc, "pq": pq, "prompt_version": version})
        return scores, details

    def score(self, batch: ScoreBatch) -> ScoreResult:
        if self.mode == "editscore":
            return self._score_editscore(batch)

        def run(valid: list[int]):
            inputs = self.build_inputs(
                [batch.sources[i] for i in valid],
                [batch.edited[i] for i in valid],
                [batch.instructions[i] for i in valid],
            )
            return self._read(*self._forward(inputs), len(valid))

        return score_valid(batch, False, run, lambda i: self.check_instruction(batch.instructions[i]))

    def _score_editscore(self, batch: ScoreBatch) -> ScoreResult:
        from reward_servers.editscore import score_editscore

        texts: dict[int, dict[str, str]] = {}

        def run(valid: list[int]):
            pick = lambda seq: [seq[i] for i in valid]  # noqa: E731
            scores, details, got = score_editscore(
                self, pick(batch.sources), pick(batch.edited), pick(batch.instructions)
            )
            texts.update(zip(valid, got, strict=True))
            return scores, details

        result = score_valid(batch, False, run, lambda i: self.check_instruction(batch.instructions[i]))
        result.texts = [texts.get(i, {}) for i in range(len(batch))]
        return result


def save_tiny(folder: str, seed: int = 0, family: str = "qwen2_vl") -> str:
    """A tiny random Qwen2-VL or Qwen3-VL with a word-level tokenizer (digits split, as Qwen's),
    a Qwen-style chat template and a small image processor, saved to `folder` (see `vlm_tiny.py`)."""
    from reward_servers.vlm_tiny import save_tiny_vlm

    return save_tiny_vlm(folder, seed, family)
