"""The VLM judge's prompts and answer reading: the versioned prompt file, the chat-template rendering
of (images, question) with each image's placeholder expanded, and ratings read from logits.

Ratings are never parsed from generated text. For a scale "0".."N" the answer slot's distribution is
read from the logits of one forward pass. Qwen tokenizers write every digit as its own token, so on
a 0-10 scale "10" is two tokens ("1", "0"): the prompt then carries "1" appended after the answer
slot, and because the model is causal one forward pass gives both the answer slot's distribution p
(logits at position -2) and the distribution q after "1" (position -1):

    P("10") = p("1") q("0"),   P("1") = p("1") (1 - q("0")),   P(k) = p(k) for the other digits.

Probabilities are normalised over the scale and the rating is their expected value, sum_k k P(k)
(Edit-R1, PKU-YuanGroup/Edit-R1 `reward_server/reward_server_transformers.py`, `_transformers_evaluate`:
softmax over the score tokens' logits, then sum(probs * arange) / max_score). With single-token labels
the two are the same formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from reward_servers.errors import UserError

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts" / "vlm_judge.yaml"
MODES = ("yes_no", "rating", "viescore")
IMAGE_PAD = "<|image_pad|>"


@dataclass(frozen=True)
class Question:
    """One question put to the judge: `key` names it in the details (e.g. "sc.success")."""

    key: str
    images: tuple[str, ...]  # "source" / "edit", in the order the model sees them
    text: str  # with {instruction} (and {max_rating} in rating mode)


@dataclass(frozen=True)
class PromptSet:
    """The questions of one mode and the prompt file's version."""

    version: int
    mode: str
    questions: tuple[Question, ...]
    groups: dict[str, tuple[str, ...]]  # viescore: "sc" / "pq" -> question keys; else {}


def _question(key: str, entry: Any, path: Path) -> Question:
    if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
        raise UserError(f"{path}: prompt {key!r} needs a `text` string")
    images = tuple(entry.get("images") or ("source", "edit"))
    if not images or any(im not in ("source", "edit") for im in images):
        raise UserError(f"{path}: prompt {key!r}: images must list 'source' and/or 'edit', got {images}")
    if "{instruction}" not in entry["text"] and "source" in images:
        raise UserError(f"{path}: prompt {key!r}: text must contain '{{instruction}}'")
    return Question(key, images, entry["text"])


def load_prompts(mode: str, path: str | Path | None = None, modes: tuple[str, ...] = MODES) -> PromptSet:
    """Read the questions of `mode` (one of `modes`) from the prompt file (None: the shipped one)."""
    if mode not in modes:
        raise UserError(f"vlm_judge: mode must be one of {list(modes)}, got {mode!r}")
    path = Path(path) if path else DEFAULT_PROMPTS
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"vlm_judge: cannot read prompts_path {path}: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("version"), int):
        raise UserError(f"{path}: the prompt file needs an integer `version`")
    if mode not in data:
        raise UserError(f"{path}: no prompts for mode {mode!r}")
    entry = data[mode]
    if mode != "viescore":
        return PromptSet(data["version"], mode, (_question(mode, entry, path),), {})
    questions, groups = [], {}
    for group in ("sc", "pq"):
        subs = (entry or {}).get(group)
        if not isinstance(subs, dict) or not subs:
            raise UserError(f"{path}: viescore.{group} must map names to prompts")
        keys = tuple(f"{group}.{name}" for name in subs)
        questions += [_question(k, subs[name], path) for k, name in zip(keys, subs, strict=True)]
        groups[group] = keys
    return PromptSet(data["version"], mode, tuple(questions), groups)


def render(tokenizer: Any, question: Question, instruction: str, pad_counts: list[int], **fields: Any) -> str:
    """The chat-template text of one question, each image's `<|image_pad|>` repeated `pad_counts[j]`
    times (the number of merged patches of image j, as the checkpoint's processor expands it)."""
    content = [{"type": "image"} for _ in question.images]
    content.append({"type": "text", "text": question.text.format(instruction=instruction, **fields)})
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    parts = text.split(IMAGE_PAD)
    if len(parts) != len(pad_counts) + 1:
        raise UserError(
            f"vlm_judge: the chat template wrote {len(parts) - 1} {IMAGE_PAD} for {len(pad_counts)} images"
        )
    out = parts[0]
    for count, rest in zip(pad_counts, parts[1:], strict=True):
        out += IMAGE_PAD * count + rest
    return out


class RatingReader:
    """Expected rating over the labels "0".."max_rating" from answer-slot logits.

    Args:
        tokenizer: the judge's tokenizer.
        max_rating: the top of the scale (N); labels are str(0) .. str(N).
    """

    def __init__(self, tokenizer: Any, max_rating: int) -> None:
        if max_rating < 1:
            raise UserError(f"vlm_judge: max_rating must be >= 1, got {max_rating}")
        self.max_rating = max_rating
        tokens = [tokenizer.encode(str(k), add_special_tokens=False) for k in range(max_rating + 1)]
        if any(not t or t[0] == tokenizer.unk_token_id for t in tokens):
            raise UserError(f"vlm_judge: the tokenizer cannot write the ratings 0..{max_rating}")
        if any(len(t) > 2 for t in tokens):
            raise UserError(f"vlm_judge: max_rating {max_rating}: ratings of more than two tokens")
        prefixes = {t[0] for t in tokens if len(t) == 2}
        if len(prefixes) > 1:
            raise UserError(f"vlm_judge: max_rating {max_rating}: two-token ratings must share a first token")
        self.prefix: int | None = prefixes.pop() if prefixes else None  # appended after the answer slot
        self.tokens = tokens

    def expected(self, logits_answer, logits_next=None):
        """(R,) expected ratings in [0, N] and (R,) label mass at the answer slot.

        Args:
            logits_answer: (R, V) logits at the answer slot.
            logits_next: (R, V) logits after the appended prefix token (needed when `prefix` is set).
        """
        import torch

        p = torch.softmax(logits_answer.float(), dim=-1)
        q = torch.softmax(logits_next.float(), dim=-1) if self.prefix is not None else None
        seconds = [t[1] for t in self.tokens if len(t) == 2]
        cols = []
        for t in self.tokens:
            if len(t) == 2:
                cols.append(p[:, t[0]] * q[:, t[1]])
            elif t[0] == self.prefix:
                cols.append(p[:, t[0]] * (1 - q[:, seconds].sum(-1)).clamp_min(0))
            else:
                cols.append(p[:, t[0]])
        probs = torch.stack(cols, dim=-1)  # (R, N + 1)
        mass = probs.sum(-1)
        weights = probs / mass.clamp_min(1e-30)[:, None]
        ratings = (weights * torch.arange(self.max_rating + 1, dtype=weights.dtype)).sum(-1)
        return ratings, mass


# Defaults of the judges' `max_instruction_bytes` / `max_instruction_tokens` scorer options.
MAX_INSTRUCTION_BYTES = 8192
MAX_INSTRUCTION_TOKENS = 1024


def instruction_problem(tokenizer, instruction: str, max_bytes: int, max_tokens: int) -> str | None:
    """Why `instruction` is too long for a judge's prompt, in one line (None when it fits): its UTF-8
    bytes are checked before tokenising, so a huge one costs nothing; then its tokens."""
    size = len(instruction.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        return f"instruction of {size} bytes exceeds max_instruction_bytes {max_bytes}"
    tokens = len(tokenizer.encode(instruction, add_special_tokens=False))
    if tokens > max_tokens:
        return f"instruction of {tokens} tokens exceeds max_instruction_tokens {max_tokens}"
    return None


def check_limits(max_bytes: int, max_tokens: int, scorer: str) -> None:
    if max_bytes < 1 or max_tokens < 1:
        raise ValueError(f"{scorer}: max_instruction_bytes and max_instruction_tokens must be >= 1")
