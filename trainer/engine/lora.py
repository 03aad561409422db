"""LoRA adapters on the denoiser, with the targets checked first: a target that matches no module
fails in one line naming it (peft only refuses when none matches, and silently skips the rest)."""

from __future__ import annotations

from types import ModuleType

import torch

from trainer.config import Config
from trainer.errors import UserError


def lora_targets(config: Config, editor: ModuleType) -> list[str]:
    """`model.lora_targets`, or the editor family's (`LORA_TARGETS`) when it is empty."""
    return list(config.model.lora_targets or editor.LORA_TARGETS)


def unmatched_targets(module: torch.nn.Module, targets: list[str]) -> list[str]:
    """The targets no module name equals or ends with (".target"), peft's rule for a list of names."""
    names = [n for n, _ in module.named_modules()]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def add_lora(module: torch.nn.Module, config: Config, targets: list[str]) -> None:
    """Add the run's LoRA adapters (`model.lora_rank`, `model.lora_alpha`, seeded Gaussian init)."""
    from peft import LoraConfig

    missing = unmatched_targets(module, targets)
    if missing:
        raise UserError(
            f"LoRA targets match nothing in {type(module).__name__}: {', '.join(missing)} "
            "(set model.lora_targets to module names of the denoiser)"
        )
    torch.manual_seed(config.run.seed)
    module.add_adapter(
        LoraConfig(
            r=config.model.lora_rank,
            lora_alpha=config.model.lora_alpha,
            init_lora_weights="gaussian",
            target_modules=list(targets),
        )
    )
