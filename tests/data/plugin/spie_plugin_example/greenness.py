"""A weight-free scorer: how green an edit is, the green channel's mean minus the others', in [-1, 1]."""

from __future__ import annotations

import numpy as np

from reward_servers.base import ScoreBatch, ScoreResult


class GreennessScorer:
    name = "greenness"
    version = "1"
    model_id = ""
    higher_is_better = True

    def __init__(self, max_batch_size: int = 256) -> None:
        self.max_batch_size = max_batch_size

    def score(self, batch: ScoreBatch) -> ScoreResult:
        scores = []
        for image in batch.edited:
            x = np.asarray(image, dtype=np.float64) / 255.0
            scores.append(x[..., 1].mean() - 0.5 * (x[..., 0].mean() + x[..., 2].mean()))
        return ScoreResult(np.array(scores), details=[{"green": s} for s in scores])
