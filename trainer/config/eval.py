"""The `eval` section: the probe set and the held-out comparison after training."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalConfig:
    """What `spie train` does after the last epoch: plots, and a held-out comparison (`spie evaluate`)."""

    # Compare the starting model (model.pretrained) with the trained one on held-out inputs and
    # write eval/eval.json and eval/before_after.png in the run folder.
    after_training: bool = False
    # Held-out inputs to compare on (the first n of the evaluation data).
    num_items: int = 64
    # Noise seed of the comparison (item i uses the same noise for both models) and bootstrap seed.
    seed: int = 0
    # `--set` overrides that turn the training data into the held-out data.
    data_overrides: tuple[str, ...] = ("data.split=heldout",)
    # Bootstrap resamples for the 95 % confidence intervals.
    resamples: int = 2000
    # Every this many epochs (0: never), and before the first, sample a fixed probe set of held-out
    # inputs (the data of `data_overrides`) with fixed per-item noise under the current policy and
    # score it: `probe.<scorer>.mean` and its details in metrics.jsonl, drawn in reward_curve.png.
    # Unlike the training batches' means, it moves only when the policy does.
    probe_every: int = 0
    # Inputs in the probe set (one edit each).
    probe_items: int = 32
