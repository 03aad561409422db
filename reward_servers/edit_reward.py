"""`edit_reward`: a scalar edit reward model in the style of EditReward (TIGER-AI-Lab/EditReward,
`EditReward/model/qwen2_5_vl_trainer.py`, `Qwen2_5_VLRewardModelBT_MultiHead`): a Qwen2.5-VL backbone
reads (source, edit, instruction) through its chat template, and small MLP heads (Linear / ReLU
stacks, kept in float32) map the last token's final hidden state to one number each, here one head
for instruction following and one for quality. The score reduces the heads (`min`, EditReward's
multi-head pooling, or `mean`); details `instruction`, `quality` (each head's name) and
`prompt_version`.

What changed from upstream: the heads run on the last position of a left-padded batch (upstream finds
the last non-pad token of a right-padded one; both read the same token), inference only, and the
head weights load from a safetensors file (`head_path`, keys `<head>.<layer index>.weight|bias`)
beside the backbone, so any Qwen2.5-VL / Qwen3-VL checkpoint can carry them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reward_servers.base import ScoreBatch, ScoreResult, register_scorer
from reward_servers.vision import score_valid, torch_dtype
from reward_servers.vlm_prompts import (
    MAX_INSTRUCTION_BYTES,
    MAX_INSTRUCTION_TOKENS,
    check_limits,
    instruction_problem,
    load_prompts,
    render,
)

HEAD_FILE = "reward_heads.safetensors"


def build_heads(state: dict, names: tuple[str, ...]):
    """`torch.nn.ModuleDict` of MLP heads from a state dict with keys `<head>.<i>.weight|bias`:
    the Linear layers at indices i, with a ReLU between consecutive ones."""
    import torch

    heads = torch.nn.ModuleDict()
    for name in names:
        indices = sorted({int(k.split(".")[1]) for k in state if k.startswith(f"{name}.")})
        if not indices:
            raise ValueError(f"head_path has no weights for head {name!r} (keys {name}.<i>.weight)")
        layers: list = []
        for j, i in enumerate(indices):
            weight = state[f"{name}.{i}.weight"]
            linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=f"{name}.{i}.bias" in state)
            linear.weight.data.copy_(weight)
            if linear.bias is not None:
                linear.bias.data.copy_(state[f"{name}.{i}.bias"])
            layers += [linear] if j == 0 else [torch.nn.ReLU(), linear]
        heads[name] = torch.nn.Sequential(*layers).float()
    return heads


@register_scorer("edit_reward")
class EditRewardScorer:
    """Qwen-VL backbone + scalar reward heads.

    Args:
        model_id: hub id or folder of the backbone (with tokenizer, chat template, image processor).
        head_path: safetensors file of the heads ("" : `reward_heads.safetensors` in the model folder).
        heads: head names, in the file and in the details.
        reduction: "min" or "mean" over the heads' outputs.
        device, dtype: where and in which precision the backbone runs (the heads run in float32).
        prompts_path: the prompt file ("" : the shipped one; section `edit_reward`).
        min_pixels / max_pixels: image size bounds passed to the image processor.
        max_batch_size: most items per forward pass.
        max_instruction_bytes / max_instruction_tokens: the longest instruction a prompt takes, in
            UTF-8 bytes (checked before tokenising) and in tokens; a longer one fails its item alone.
    """

    name = "edit_reward"
    higher_is_better = True

    def __init__(
        self,
        model_id: str = "Qwen/Qwen2.5-VL-7B-Instruct",
        head_path: str = "",
        heads: tuple[str, ...] | list[str] = ("instruction", "quality"),
        reduction: str = "min",
        device: str = "cpu",
        dtype: str = "bfloat16",
        prompts_path: str = "",
        min_pixels: int | None = None,
        max_pixels: int | None = 448 * 448,
        max_batch_size: int = 8,
        max_instruction_bytes: int = MAX_INSTRUCTION_BYTES,
        max_instruction_tokens: int = MAX_INSTRUCTION_TOKENS,
    ) -> None:
        from safetensors.torch import load_file

        check_limits(max_instruction_bytes, max_instruction_tokens, "edit_reward")
        self.max_instruction_bytes, self.max_instruction_tokens = (
            max_instruction_bytes,
            max_instruction_tokens,
        )
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        if reduction not in ("min", "mean"):
            raise ValueError(f"reduction must be 'min' or 'mean', got {reduction!r}")
        self.prompts = load_prompts("edit_reward", prompts_path or None, modes=("edit_reward",))
        path = Path(head_path) if head_path else Path(model_id) / HEAD_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"head_path: no reward-head file at {path} (safetensors of the MLP heads)"
            )
        self.heads = build_heads(load_file(str(path)), tuple(heads)).to(device).eval()
        self.model = (
            AutoModelForImageTextToText.from_pretrained(model_id, dtype=torch_dtype(dtype)).to(device).eval()
        )
        self.tokenizer = AutoTokenizer.from_pretrained(model_id, padding_side="left")
        if not self.tokenizer.chat_template:
            raise ValueError(f"model_id {model_id!r} has no chat template in its tokenizer")
        self.image_processor = AutoImageProcessor.from_pretrained(model_id)
        self.image_kwargs = {
            k: v for k, v in {"min_pixels": min_pixels, "max_pixels": max_pixels}.items() if v
        }
        self.model_id, self.device, self.reduction = model_id, device, reduction
        self.head_names, self.max_batch_size = tuple(heads), max_batch_size
        self.version = f"1-{reduction}-prompts{self.prompts.version}"

    def build_inputs(self, sources: list[np.ndarray], edits: list[np.ndarray], instructions: list[str]):
        """input_ids, attention_mask, mm_token_type_ids (N, L), pixel_values, image_grid_thw (2N, 3)."""
        from PIL import Image

        question = self.prompts.questions[0]
        images = [
            Image.fromarray(s if role == "source" else e)
            for s, e in zip(sources, edits, strict=True)
            for role in question.images
        ]
        vision = self.image_processor(images=images, return_tensors="pt", **self.image_kwargs)
        counts = (vision["image_grid_thw"].prod(-1) // self.image_processor.merge_size**2).tolist()
        n = len(question.images)
        texts = [
            render(self.tokenizer, question, ins, counts[k * n : (k + 1) * n])
            for k, ins in enumerate(instructions)
        ]
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        mm_types = (tokens["input_ids"] == self.model.config.image_token_id).to(tokens["input_ids"].dtype)
        return {**tokens, "mm_token_type_ids": mm_types, **vision}

    def rewards(self, inputs) -> dict[str, np.ndarray]:
        """Head name -> (N,) outputs at the last position."""
        import torch

        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        with torch.inference_mode():
            out = self.model(**inputs, use_cache=False, output_hidden_states=True)
            last = out.hidden_states[-1][:, -1, :].float()  # (N, hidden)
            return {name: self.heads[name](last)[:, 0].double().cpu().numpy() for name in self.head_names}

    def score(self, batch: ScoreBatch) -> ScoreResult:
        def run(valid: list[int]):
            inputs = self.build_inputs(
                [batch.sources[i] for i in valid],
                [batch.edited[i] for i in valid],
                [batch.instructions[i] for i in valid],
            )
            per_head = self.rewards(inputs)
            stacked = np.stack([per_head[h] for h in self.head_names], axis=1)  # (N, heads)
            scores = stacked.min(axis=1) if self.reduction == "min" else stacked.mean(axis=1)
            version = float(self.prompts.version)
            details = [
                {**{h: float(per_head[h][j]) for h in self.head_names}, "prompt_version": version}
                for j in range(len(valid))
            ]
            return scores, details

        limits = (self.max_instruction_bytes, self.max_instruction_tokens)
        return score_valid(
            batch, False, run, lambda i: instruction_problem(self.tokenizer, batch.instructions[i], *limits)
        )


def save_tiny(folder: str, seed: int = 0, hidden: int = 32) -> str:
    """A tiny random Qwen2.5-VL backbone (see `vlm_tiny.py`) and seeded two-head MLPs (hidden -> 16 ->
    1) in `folder/reward_heads.safetensors`."""
    import torch
    from safetensors.torch import save_file

    from reward_servers.vlm_tiny import save_tiny_vlm

    save_tiny_vlm(folder, seed, "qwen2_5_vl")
    g = torch.Generator().manual_seed(seed + 1)
    state = {}
    for name in ("instruction", "quality"):
        state[f"{name}.0.weight"] = torch.randn(16, hidden, generator=g) * 0.3
        state[f"{name}.0.bias"] = torch.randn(16, generator=g) * 0.1
        state[f"{name}.2.weight"] = torch.randn(1, 16, generator=g) * 0.3
    save_file(state, f"{folder}/{HEAD_FILE}")
    return folder
