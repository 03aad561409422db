"""`sleep`: a latency-bound scorer standing in for a GPU model, for tests, benchmarks and compose demos.

Each `score` call sleeps a fixed `batch_seconds` (plus `item_seconds` per item), the way a GPU
forward pass takes about the same time for any batch up to its size, and uses almost no CPU. The
score is the edit's mean brightness in [0, 1], so a test can check that each item got its own score.
It is step-aware the simplest way: an item whose metadata carries SPO's `step` (the denoising step of
a candidate, `trainer.stepwise`) gets it back as the detail `step`, so a test sees what arrived.
An item whose instruction equals `poison` makes the call raise, as a model that fails on one input;
one whose instruction equals `nan` gets a NaN score, as a model whose output is not a number.
"""

from __future__ import annotations

import time

import numpy as np

from reward_servers.base import ScoreBatch, ScoreResult, register_scorer


@register_scorer("sleep")
class SleepScorer:
    """Sleeps `batch_seconds + item_seconds * N` per batch of N; scores mean brightness."""

    name = "sleep"
    version = "1"
    model_id = ""
    higher_is_better = True

    def __init__(
        self,
        batch_seconds: float = 0.1,
        item_seconds: float = 0.0,
        max_batch_size: int = 8,
        poison: str = "__poison__",
        nan: str = "__nan__",
    ) -> None:
        if batch_seconds < 0 or item_seconds < 0 or max_batch_size < 1:
            raise ValueError("sleep: batch_seconds and item_seconds must be >= 0, max_batch_size >= 1")
        self.batch_seconds = batch_seconds
        self.item_seconds = item_seconds
        self.max_batch_size = max_batch_size
        self.poison, self.nan = poison, nan

    def score(self, batch: ScoreBatch) -> ScoreResult:
        time.sleep(self.batch_seconds + self.item_seconds * len(batch))
        for instruction in batch.instructions:
            if self.poison and instruction == self.poison:
                raise RuntimeError(f"sleep: poison item ({self.poison!r})")
        scores = [float(np.mean(image, dtype=np.float64) / 255.0) for image in batch.edited]  # no float copy
        scores = [
            np.nan if self.nan and t == self.nan else s
            for s, t in zip(scores, batch.instructions, strict=True)
        ]
        steps = [batch.meta(i).get("step") for i in range(len(batch))]
        details = [{"step": float(s)} if isinstance(s, int | float) else {} for s in steps]
        return ScoreResult(np.array(scores), details)
