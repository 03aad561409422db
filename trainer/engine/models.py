"""Which model a path names, and loading it: the one checked loader of trained weights.

A model spec is a run folder or checkpoint folder (the base model its config names plus the trained
tensors), or a base model used as is (`tiny`, a diffusers folder such as `models/toy-editor`, or a
hub id). `spie train` (resume), `generate`, `evaluate` and the Ray workers load weights this way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sampler.editors import TINY_FAMILIES
from sampler.policy import EditPolicy
from trainer.config import Config, load_config
from trainer.engine.policy import (
    build_policy,
    load_trainable_into_policy,
    resolve_device,
    trainable_parameters,
)
from trainer.errors import UserError
from trainer.run.checkpoint import find_checkpoint, load_checkpoint


@dataclass(frozen=True)
class ModelSpec:
    """One model to evaluate: `spec` as the user gave it, `kind` "checkpoint" or "base", the
    checkpoint folder (checkpoint kind) and the configuration it is built from."""

    label: str
    spec: str
    kind: str
    checkpoint: Path | None
    config: Config

    @property
    def short(self) -> str:
        """A short name for pictures: the checkpoint's `epoch_NNNN` or the base model's folder name."""
        if self.checkpoint is not None:
            return self.checkpoint.name
        return Path(self.spec).name or self.spec

    def describe(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "spec": self.spec,
            "kind": self.kind,
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
            "pretrained": self.config.model.pretrained,
            "short": self.short,
        }


def is_run_or_checkpoint(path: Path) -> bool:
    return (path / "trainable.safetensors").is_file() or (path / "checkpoints").is_dir()


def model_spec(spec: str, label: str, config: Config) -> ModelSpec:
    """Classify `spec` and give the config its model is built from (sampling from `config`)."""
    path = Path(spec)
    if is_run_or_checkpoint(path):
        folder = find_checkpoint(path)
        own = load_config(folder / "config.yaml")
        # Architecture and base weights from the run; sampling, device and data from the evaluation.
        cfg = dataclasses.replace(
            config, model=own.model, run=dataclasses.replace(config.run, seed=own.run.seed)
        )
        return ModelSpec(label, spec, "checkpoint", folder, cfg)
    if spec not in TINY_FAMILIES and not path.exists():
        parts = path.parts
        if len(parts) != 2 or Path(parts[0]).exists() or spec.startswith((".", "/")):
            raise UserError(
                f"model {spec!r}: not found (expected a run or checkpoint folder, a diffusers model "
                "folder, 'tiny' or a hub id)"
            )
    if path.is_dir() and not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
        raise UserError(
            f"model {spec!r}: {path} is neither a run/checkpoint folder (checkpoints/, "
            "trainable.safetensors) nor a diffusers model folder (model_index.json)"
        )
    model = dataclasses.replace(config.model, pretrained=spec, use_lora=False, exemplar_conditioning=False)
    return ModelSpec(label, spec, "base", None, dataclasses.replace(config, model=model))


def load_policy(model: ModelSpec) -> EditPolicy:
    """Build the model's policy and, for a checkpoint, load its trained weights after checking that
    every tensor fits the model."""
    cfg = model.config
    policy = build_policy(cfg, resolve_device(cfg.run.device))
    if model.checkpoint is None:
        return policy
    trainable, _ = load_checkpoint(model.checkpoint)
    file = model.checkpoint / "trainable.safetensors"
    params = trainable_parameters(policy, cfg.model.use_lora)
    missing, extra = sorted(set(params) - set(trainable)), sorted(set(trainable) - set(params))
    what = f"model {cfg.model.pretrained!r}, use_lora={cfg.model.use_lora}, lora_rank={cfg.model.lora_rank}"
    if missing or extra:
        name = (missing or extra)[0]
        lack = "lacks" if missing else "has an unexpected"
        raise UserError(f"{file} does not fit the model ({what}): it {lack} weight {name}")
    for name, p in params.items():
        if trainable[name].shape != p.shape:
            raise UserError(
                f"{file} does not fit the model ({what}): weight {name} has shape "
                f"{tuple(trainable[name].shape)}, the model expects {tuple(p.shape)}"
            )
    load_trainable_into_policy(policy, trainable, cfg.model.use_lora)
    return policy
