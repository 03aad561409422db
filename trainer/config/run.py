"""The `run` section: names, seeds, epochs, checkpoints, device and loggers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class RunConfig:
    # Run name; the run directory is `<output_dir>/<name>`. Empty: a timestamped name.
    name: str = ""
    # Parent directory of all runs.
    output_dir: str = "runs"
    # Global random seed (sampling noise, data order, tiny-model weights).
    seed: int = 0
    # Number of epochs; each epoch samples a fresh batch of edits, scores it and trains on it.
    num_epochs: int = 10
    # Save a checkpoint every this many epochs (the last epoch is always saved).
    save_freq: int = 1
    # Keep at most this many checkpoints (0: keep all).
    checkpoint_limit: int = 3
    # Device for the policy: "auto" (cuda if present, else cpu), "cpu", "cuda", "cuda:1"...
    device: str = "auto"
    # Mixed precision for the trainable forward/backward: "no", "fp16" or "bf16".
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    # Suppress progress bars (CI, logs).
    quiet: bool = False
    # Save a grid of sample edits every this many epochs (0: never).
    image_log_freq: int = 1
    # Trackers that mirror metrics.jsonl and the sample grids, through accelerate's trackers:
    # any of "tensorboard", "wandb", "mlflow" (wandb and mlflow must be installed); [] for none.
    log_with: tuple[str, ...] = ("tensorboard",)
