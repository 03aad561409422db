"""Running reward statistics across epochs."""

from __future__ import annotations

import math

import numpy as np


class RewardStats:
    """Running mean and variance of each scorer's scores across epochs (Welford), kept in checkpoints.

    PPO normalises groups smaller than `train.min_group_size` with these statistics.
    """

    def __init__(self) -> None:
        self.stats: dict[str, list[float]] = {}  # name -> [count, mean, M2]

    def update(self, name: str, values: np.ndarray) -> None:
        count, mean, m2 = self.stats.get(name, [0.0, 0.0, 0.0])
        for v in values[np.isfinite(values)].tolist():
            count += 1
            delta = v - mean
            mean += delta / count
            m2 += delta * (v - mean)
        self.stats[name] = [count, mean, m2]

    def mean_std(self, name: str) -> tuple[float, float] | None:
        count, mean, m2 = self.stats.get(name, [0.0, 0.0, 0.0])
        if count < 2:
            return None
        return mean, math.sqrt(m2 / (count - 1))

    def state_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.stats.items()}

    def load_state_dict(self, state: dict[str, list[float]]) -> None:
        self.stats = {k: [float(x) for x in v] for k, v in state.items()}
