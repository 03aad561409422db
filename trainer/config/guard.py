"""The `guard` section: alarms for reward hacking, checked on the held-out probe set.

Each threshold is how far a statistic of the current policy's probe edits may move from the
starting policy's edits of the same inputs under the same noise (`trainer.guard.stats`); 0 turns
that statistic's guard off. They are checked whenever the probe runs (`eval.probe_every`, and before
the first epoch for the reference), or every epoch with `every_epoch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class GuardConfig:
    # "warn": one line per statistic over its threshold; "stop": the same line, then the run ends
    # after that epoch's checkpoint (the report still runs); "off": no statistics.
    action: Literal["off", "warn", "stop"] = "warn"
    # Sample the probe set every epoch (not only every `eval.probe_every`) to check the guards.
    every_epoch: bool = False
    # Absolute change of the mean luminance in [0, 1] (an OCR reward that wiped backgrounds: dark
    # pixels 0.45 -> 0.93).
    brightness: float = 0.1
    # Absolute change of the mean HSV saturation in [0, 1].
    saturation: float = 0.1
    # Absolute change of the fraction of pixels with luminance < 0.1 / > 0.9.
    dark_fraction: float = 0.15
    bright_fraction: float = 0.15
    # Absolute change of the share of luminance energy above a quarter of the sampling rate.
    high_frequency: float = 0.1
    # Absolute change of the share of luminance energy on period-2 and period-4 lines (the grid and
    # checkerboard artefacts reported on Qwen-Image: Flow-GRPO issues 204, 233).
    grid: float = 0.05
    # Relative change of the RMS of the final latents x0 (x0-norm drift in DiffusionNFT runs).
    x0_norm: float = 0.25
    # KL to the frozen reference (the learner's `kl`, logged when train.kl_coef > 0), absolute.
    kl: float = 0.0
