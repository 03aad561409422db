"""`spie train --dry-run`: every model of a run at its real architecture on the meta device, its LoRA
targets checked, one train step and one sampling step at full size, and a memory plan per process role.

No weights, tokenizers, hub or GPU are needed: architectures come from `configs/arch` (or the model
folder's own configs), and tensors on the meta device have shapes and dtypes only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from sampler.editors import TINY_FAMILIES, editor_family, load_editor
from trainer.config import Config
from trainer.engine.policy import trainable_parameters
from trainer.errors import UserError
from trainer.plan.arch import arch_folder, build_model, param_bytes, param_count
from trainer.plan.step import meta_policy, policy_modules, sample_step, train_step
from trainer.registry import make_objective

GIB = 2**30
# Scorer name -> the model id its constructor loads by default (`reward_servers`); hpsv2 is open_clip's
# ViT-H-14, whose architecture is laion's CLIP ViT-H/14.
SCORER_MODELS = {
    "vlm_judge": "Qwen/Qwen2-VL-2B-Instruct",
    "depth_structure": "depth-anything/Depth-Anything-V2-Small-hf",
    "segmentation_structure": "nvidia/segformer-b0-finetuned-ade-512-512",
    "aesthetic": "openai/clip-vit-large-patch14",
    "clip_score": "openai/clip-vit-large-patch14",
    "hpsv2": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
}
DTYPE_NAMES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


@dataclass
class Role:
    """One process's memory, in bytes: `parts` (label -> bytes) add up to `total`."""

    name: str
    gpus: float
    parts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _by_dtype(modules) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in modules:
        for k, v in param_bytes(m).items():
            out[k] = out.get(k, 0) + v
    return out


def _editor_roles(config: Config, lines: list[str]) -> list[Role]:
    m, t = config.model, config.train
    kept = arch_folder(m.pretrained) if m.pretrained not in TINY_FAMILIES else None
    try:  # the family from the architecture on file: no hub lookup
        family = editor_family(str(kept) if kept else m.pretrained, m.editor, m.revision)
    except (OSError, ValueError) as err:
        raise UserError(f"model.pretrained: {str(err).splitlines()[0]}") from err
    editor = load_editor(family)
    if m.pretrained == editor.TINY_NAME or m.pretrained in TINY_FAMILIES:
        folder = arch_folder(editor.tiny_model(m.tiny_dir, config.run.seed))
    else:
        folder = arch_folder(m.pretrained)
    if folder is None:
        raise UserError(
            f"dry run: no architecture on file for {m.pretrained!r} (add configs/arch/"
            f"{m.pretrained.replace('/', '--')}/ with its model_index.json and configs, or point "
            "model.pretrained at a local model folder)"
        )
    policy = meta_policy(config, family, folder)
    modules = policy_modules(policy)
    lines.append(f"editor {m.pretrained} ({family}), architecture from {folder}")
    for name, mod in modules.items():
        lines.append(f"  {name}: {type(mod).__name__}, {param_count(mod) / 1e9:.3f} B parameters")
    trainable = list(trainable_parameters(policy, m.use_lora).values())  # marks them requires_grad
    n_train = sum(p.numel() for p in trainable)
    lines.append(
        f"  trained: {n_train / 1e6:.2f} M parameters ({'LoRA rank ' + str(m.lora_rank) if m.use_lora else 'full'})"
    )
    what = f"at {m.resolution} px"
    try:
        plain = train_step(policy, family, config)
        ckpt = train_step(policy, family, config, checkpointing=True)
        sampling = sample_step(policy, family, config)
    except UserError:
        raise
    except Exception as err:  # a shape that does not fit at full size
        raise UserError(
            f"dry run: the train step of {type(policy.denoiser).__name__} {what}, micro-batch "
            f"{t.batch_size}, fails: {type(err).__name__}: {str(err).splitlines()[0]}"
        ) from err
    weights = _by_dtype(modules.values())
    lora_bytes = sum(p.numel() * 4 for p in trainable)
    weights["float32"] = weights.get("float32", 0) - (lora_bytes if m.use_lora else 0)
    weight_parts = {f"weights {k}": v for k, v in weights.items() if v > 0}
    ckpt_on = t.gradient_checkpointing if t.objective == "alignprop" else t.denoiser_checkpointing
    step = ckpt if ckpt_on else plain
    learner = Role("learner", config.ray.num_gpus_per_learner if config.ray.enabled else 1.0)
    learner.parts.update(weight_parts)
    if config.ray.enabled and not make_objective(config).learner_reads_text:
        # Ray learners drop the text encoders (`trainer.engine.policy.drop_text_encoders`).
        encoders = [mod for name, mod in modules.items() if name.startswith("text_encoder")]
        for k, v in _by_dtype(encoders).items():
            learner.parts[f"weights {k}"] -= v
            if learner.parts[f"weights {k}"] <= 0:
                del learner.parts[f"weights {k}"]
        if encoders:
            learner.notes.append(
                f"text encoders dropped on the learner, {_gib(sum(_by_dtype(encoders).values()))}: it "
                "trains on the embeddings the rollout workers recorded"
            )
    learner.parts["trained weights (fp32)"] = lora_bytes
    learner.parts["gradients (fp32)"] = lora_bytes
    learner.parts["AdamW state (2 x fp32)"] = 2 * lora_bytes
    learner.parts[f"train step, micro-batch {t.batch_size} {what}"] = step.peak
    learner.notes.append(
        f"activations kept for backward: {_gib(plain.saved)} without gradient checkpointing "
        f"(step peak {_gib(plain.peak)}), {_gib(ckpt.saved)} with (step peak {_gib(ckpt.peak)}); "
        f"this run {'checkpoints' if ckpt_on else 'does not checkpoint'}"
    )
    worker = Role("rollout worker", config.ray.num_gpus_per_worker if config.ray.enabled else 1.0)
    worker.parts.update(weight_parts)
    worker.parts["trained weights (fp32)"] = lora_bytes
    n = config.sample.batch_size * config.sample.nb_gen
    worker.parts[f"sampling step, {n} edits {what}"] = sampling
    return [worker, learner]


def _scorer_roles(config: Config, lines: list[str]) -> list[Role]:
    roles = []
    replicas = {s.scorer: s for s in getattr(config.reward.ray, "scorers", []) or []}
    for s in config.reward.scorers:
        model_id = s.kwargs.get("model_id") or SCORER_MODELS.get(s.name)
        if model_id is None:
            lines.append(f"scorer {s.name}: no model (weight-free)")
            continue
        folder = arch_folder(model_id)
        if s.name == "hpsv2":
            folder = arch_folder(SCORER_MODELS["hpsv2"])
        if folder is None:
            lines.append(f"scorer {s.name}: no architecture on file for {model_id} (not planned)")
            continue
        dtype = DTYPE_NAMES.get(str(s.kwargs.get("dtype", "")), torch.float32)
        model = build_model(folder, dtype)
        lines.append(
            f"scorer {s.name}: {model_id}, {type(model).__name__}, {param_count(model) / 1e9:.3f} B parameters"
        )
        rep = replicas.get(s.name)
        role = Role(
            f"reward replica {s.name}" + (f" (x{rep.min_replicas}-{rep.max_replicas})" if rep else ""),
            float(rep.num_gpus) if rep else 1.0,
        )
        role.parts.update({f"weights {k}": v for k, v in param_bytes(model).items()})
        role.notes.append("inference activations not estimated (small next to the weights at batch 16)")
        roles.append(role)
    return roles


def dry_run(config: Config, gpu_gib: float = 80.0) -> str:
    """The plan of `config` as text (raises UserError naming a LoRA target or a shape that fails)."""
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    lines: list[str] = [f"dry run of {config.run.name}: meta device, no weights, no hub"]
    roles = _editor_roles(config, lines) + _scorer_roles(config, lines)
    lines.append(f"memory per process (GPU of {gpu_gib:g} GiB):")
    for role in roles:
        budget = gpu_gib * GIB * min(role.gpus, 1.0) if role.gpus > 0 else gpu_gib * GIB
        fits = "fits" if role.total <= budget else "DOES NOT FIT"
        lines.append(f"  {role.name} ({role.gpus:g} GPU, {_gib(budget)}): {_gib(role.total)}, {fits}")
        for k, v in role.parts.items():
            if v >= 2**20:
                lines.append(f"    {k}: {_gib(v)}")
        for note in role.notes:
            lines.append(f"    ({note})")
    lines.append("batches: " + config.summary())
    return "\n".join(lines)
