"""EditScore's generative scoring (VectorSpaceLab/EditScore) with transformers alone: the VLM judge's
`editscore` mode (`vlm_judge.py` builds the model and calls `score_editscore`).

EditScore asks a Qwen-VL judge two questions per edit, each answered as JSON, reasoning first:
semantic consistency (both images; scores [editing success, degree of over-editing]) and perceptual
quality (the edit alone; [naturalness, artifacts]), each score on 0..score_range (25 for the
released checkpoints). Then (`editscore/__init__.py`, `EditScore.evaluate`, lines 129-131 at 6e0f1b9):

    SC = min(SC scores) / (score_range / 10),  PQ = min(PQ scores) / (score_range / 10),
    overall = sqrt(SC * PQ)  (in [0, 10]).

What differs, so that every number comes from logits and a tiny random model still gives a valid
score (upstream samples at temperature 0.7 and parses numbers out of the text, repairing the JSON):

1. The answer is started for the model with `answer_start` (`{"reasoning" : "`), and the reasoning is
   generated greedily (deterministic) for at most `max_new_tokens` tokens; it ends at the first token
   holding a double quote, or at the end of turn.
2. `score_prefix` (`",\n"score" : [`) is appended to the prompt plus reasoning; the first score is the
   expected value over the labels 0..score_range at the next token (`DigitReader`: Qwen tokenizers
   write "17" as "1", "7", so each label's probability multiplies the first digit's and the
   second's, read in the same causal pass with the first digit appended).
3. The second score is read the same way after the first score's most likely label and
   `score_separator` (", "): one more batched forward pass.

The reasoning texts go into `ScoreResult.texts` (`sc_reasoning`, `pq_reasoning`); served, they travel
in `Result.texts`, and `spie evaluate` writes them into each item's row of eval.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from reward_servers.errors import UserError
from reward_servers.vlm_prompts import Question, render

EDITSCORE_PROMPTS = Path(__file__).resolve().parent / "prompts" / "editscore.yaml"
QUESTIONS = ("sc", "pq")  # the two questions, in row order per item


@dataclass(frozen=True)
class EditScorePrompts:
    """The prompt file of the `editscore` mode."""

    version: int
    answer_start: str  # what the assistant's answer starts with
    score_prefix: str  # appended after the reasoning, before the first score
    score_separator: str  # between the first score and the second
    questions: tuple[Question, ...]  # sc, pq


def load_editscore_prompts(path: str | Path | None = None) -> EditScorePrompts:
    """Read the `editscore` prompt file (None: the shipped `prompts/editscore.yaml`)."""
    path = Path(path) if path else EDITSCORE_PROMPTS
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"vlm_judge: cannot read prompts_path {path}: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("version"), int):
        raise UserError(f"{path}: the prompt file needs an integer `version`")
    for key in ("answer_start", "score_prefix", "score_separator"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise UserError(f"{path}: editscore prompts need a non-empty string `{key}`")
    questions = []
    for key in QUESTIONS:
        entry = data.get(key)
        if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
            raise UserError(f"{path}: editscore prompt {key!r} needs a `text` string")
        images = tuple(entry.get("images") or ())
        if not images or any(im not in ("source", "edit") for im in images):
            raise UserError(f"{path}: editscore prompt {key!r}: images must list 'source' and/or 'edit'")
        if "{score_range}" not in entry["text"] or (
            "source" in images and "{instruction}" not in entry["text"]
        ):
            raise UserError(
                f"{path}: editscore prompt {key!r}: text needs {{score_range}} (and {{instruction}})"
            )
        questions.append(Question(key, images, entry["text"]))
    return EditScorePrompts(
        data["version"],
        data["answer_start"].format(),
        data["score_prefix"],
        data["score_separator"],
        tuple(questions),
    )


class DigitReader:
    """Expected label over 0..max_label (at most 99) written as one or two digit tokens.

    A label "d" that also starts a two-digit label needs the distribution q_d after "d": then
    P("d e") = p(d) q_d(e) and P("d") = p(d) (1 - sum_e q_d(e)) over the labels' second digits e;
    other labels have P = p(first token). Probabilities are normalised over the labels.

    Args:
        tokenizer: the judge's tokenizer (`encode`, `unk_token_id`).
        max_label: the top of the scale.
    """

    def __init__(self, tokenizer: Any, max_label: int) -> None:
        if not 1 <= max_label <= 99:
            raise UserError(f"vlm_judge: score_range must be in 1..99, got {max_label}")
        self.max_label = max_label
        self.tokens = [tokenizer.encode(str(k), add_special_tokens=False) for k in range(max_label + 1)]
        if any(not t or len(t) > 2 or tokenizer.unk_token_id in t for t in self.tokens):
            raise UserError(f"vlm_judge: the tokenizer cannot write 0..{max_label} in at most two tokens")
        # Each first digit that starts a two-digit label: one more row per read, with it appended.
        self.branches = sorted({t[0] for t in self.tokens if len(t) == 2})

    def distribution(self, answer, following: dict[int, Any]):
        """(R, max_label + 1) label probabilities, normalised, and (R,) their mass before normalising.

        Args:
            answer: (R, V) logits at the answer slot.
            following: first-digit token -> (R, V) logits after it (one per `branches`).
        """
        import torch

        p = torch.softmax(answer.float(), dim=-1)
        q = {b: torch.softmax(following[b].float(), dim=-1) for b in self.branches}
        seconds = {b: [t[1] for t in self.tokens if len(t) == 2 and t[0] == b] for b in self.branches}
        cols = []
        for t in self.tokens:
            if len(t) == 2:
                cols.append(p[:, t[0]] * q[t[0]][:, t[1]])
            elif t[0] in q:
                cols.append(p[:, t[0]] * (1 - q[t[0]][:, seconds[t[0]]].sum(-1)).clamp_min(0))
            else:
                cols.append(p[:, t[0]])
        probs = torch.stack(cols, dim=-1)
        mass = probs.sum(-1)
        return probs / mass.clamp_min(1e-30)[:, None], mass

    def expected(self, probs):
        """(R,) expected labels sum_k k P(k) of (R, max_label + 1) probabilities."""
        import torch

        return (probs * torch.arange(self.max_label + 1, dtype=probs.dtype)).sum(-1)


def editscore_overall(
    sc_scores: list[float], pq_scores: list[float], score_range: int
) -> tuple[float, float, float]:
    """(SC, PQ, overall) from the raw 0..score_range scores, EditScore's formula (module docstring)."""
    sc = min(sc_scores) / (score_range / 10)
    pq = min(pq_scores) / (score_range / 10)
    return sc, pq, math.sqrt(max(sc, 0.0) * max(pq, 0.0))


class _Rows:
    """The R = N items x 2 questions rows of one batch: their prompt token ids (unpadded) and, per
    row, the pixel patches and grids of its images, so any continuation can be run batched."""

    def __init__(self, judge: Any, sources, edits, instructions) -> None:
        from PIL import Image

        prompts = judge.prompts
        rows = [(k, q) for k in range(len(instructions)) for q in prompts.questions]
        images = [
            Image.fromarray(sources[k] if role == "source" else edits[k])
            for k, q in rows
            for role in q.images
        ]
        vision = judge.image_processor(images=images, return_tensors="pt", **judge.image_kwargs)
        grids = vision["image_grid_thw"]
        sizes = grids.prod(-1).tolist()
        patches = list(vision["pixel_values"].split(sizes))
        counts = (grids.prod(-1) // judge.image_processor.merge_size**2).tolist()
        self.ids, self.pixels, self.grids, start = [], [], [], 0
        for k, q in rows:
            n = len(q.images)
            text = render(
                judge.tokenizer, q, instructions[k], counts[start : start + n], score_range=judge.max_rating
            )
            self.ids.append(judge.tokenizer.encode(text + prompts.answer_start, add_special_tokens=False))
            self.pixels.append(patches[start : start + n])
            self.grids.append(grids[start : start + n])
            start += n

    def inputs(self, judge: Any, tails: list[list[int]], rows: list[int]):
        """Model inputs for `rows` (indices), each its prompt then `tails[j]`, padded on the left."""
        import torch

        seqs = [self.ids[r] + tail for r, tail in zip(rows, tails, strict=True)]
        width = max(len(s) for s in seqs)
        pad = judge.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        # 1 marks image tokens for multimodal RoPE (what the Qwen-VL processors return).
        mm_types = (ids == judge.model.config.image_token_id).to(ids.dtype)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_token_type_ids": mm_types,
            "pixel_values": torch.cat([p for r in rows for p in self.pixels[r]]),
            "image_grid_thw": torch.cat([self.grids[r] for r in rows]),
        }


def _device(judge: Any, inputs: dict) -> dict:
    inputs = {k: v.to(judge.device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(judge.model.dtype)
    return inputs


def _stops(judge: Any) -> set[int]:
    """Token ids that end the reasoning: any token holding a double quote, end of turn, padding."""
    cached = getattr(judge, "_editscore_stops", None)
    if cached is None:
        tokenizer = judge.tokenizer
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        cached = {i for i, t in enumerate(vocab) if t is not None and '"' in t}
        eos = judge.model.generation_config.eos_token_id
        cached |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        cached |= {tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
        judge._editscore_stops = cached
    return cached


def _reason(judge: Any, rows: _Rows) -> list[list[int]]:
    """Each row's reasoning token ids: greedy generation, cut at the first stop token."""
    import torch

    everything = list(range(len(rows.ids)))
    inputs = _device(judge, rows.inputs(judge, [[] for _ in everything], everything))
    width = inputs["input_ids"].shape[1]
    with torch.inference_mode():
        out = judge.model.generate(
            **inputs,
            max_new_tokens=judge.max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=judge.tokenizer.pad_token_id,
        )
    stops, reasons = _stops(judge), []
    for row in out[:, width:].tolist():
        cut = next((j for j, t in enumerate(row) if t in stops), len(row))
        reasons.append(row[:cut])
    return reasons


def _read(judge: Any, rows: _Rows, tails: list[list[int]]):
    """(R, score_range + 1) label probabilities and (R,) label mass at the end of each row's tail
    (one batched forward pass: one row per first digit that starts a two-digit label, else one)."""
    import torch

    reader: DigitReader = judge.reader
    branches = reader.branches or [None]
    index = [r for r in range(len(tails)) for _ in branches]
    ext = [tails[r] + ([b] if b is not None else []) for r in range(len(tails)) for b in branches]
    with torch.inference_mode():
        logits = judge.model(**_device(judge, rows.inputs(judge, ext, index)), use_cache=False).logits
    logits = logits.view(len(tails), len(branches), *logits.shape[1:])
    if reader.branches:
        following = {b: logits[:, j, -1] for j, b in enumerate(reader.branches)}
        return reader.distribution(logits[:, 0, -2], following)
    return reader.distribution(logits[:, 0, -1], {})


def score_editscore(judge: Any, sources, edits, instructions):
    """EditScore's overall score in [0, 10] for N items, their numeric details and reasoning texts.

    Returns (scores, details, texts): N floats; N dicts with `sc.success`, `sc.overediting`,
    `pq.naturalness`, `pq.artifacts` (each on 0..10), `sc`, `pq`, `label_mass` (the smallest of the
    four reads) and `prompt_version`; N dicts with `sc_reasoning` and `pq_reasoning`.
    """
    tok = judge.tokenizer
    rows = _Rows(judge, sources, edits, instructions)
    reasons = _reason(judge, rows)
    prefix = tok.encode(judge.prompts.score_prefix, add_special_tokens=False)
    separator = tok.encode(judge.prompts.score_separator, add_special_tokens=False)
    first_tails = [r + prefix for r in reasons]
    first, mass1 = _read(judge, rows, first_tails)
    picked = first.argmax(-1).tolist()  # the first score's most likely label, written as the model would
    second_tails = [
        t + tok.encode(str(k), add_special_tokens=False) + separator
        for t, k in zip(first_tails, picked, strict=True)
    ]
    second, mass2 = _read(judge, rows, second_tails)
    r = judge.max_rating
    a, b = judge.reader.expected(first).tolist(), judge.reader.expected(second).tolist()
    mass = [min(x, y) for x, y in zip(mass1.tolist(), mass2.tolist(), strict=True)]
    scores, details, texts = [], [], []
    names = {"sc": ("sc.success", "sc.overediting"), "pq": ("pq.naturalness", "pq.artifacts")}
    for k in range(len(instructions)):
        raw = {q: (a[2 * k + j], b[2 * k + j]) for j, q in enumerate(QUESTIONS)}
        sc, pq, overall = editscore_overall(list(raw["sc"]), list(raw["pq"]), r)
        detail = {name: v / (r / 10) for q in QUESTIONS for name, v in zip(names[q], raw[q], strict=True)}
        detail |= {"sc": sc, "pq": pq, "label_mass": min(mass[2 * k : 2 * k + 2])}
        details.append({**detail, "prompt_version": float(judge.prompts.version)})
        scores.append(overall)
        texts.append(
            {f"{q}_reasoning": tok.decode(reasons[2 * k + j]).strip() for j, q in enumerate(QUESTIONS)}
        )
    return scores, details, texts
