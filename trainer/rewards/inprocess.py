"""Scoring in the trainer process: the configured scorers are built here and called batch by batch.

The queue fabric's `RewardClient` (`trainer.rewards.queue`) offers the same `score(rollout)` over Redis.
"""

from __future__ import annotations

import numpy as np

from reward_servers.base import ScoreBatch, build_scorer
from sampler.rollout import Rollout
from trainer.config import RewardConfig
from trainer.errors import UserError
from trainer.rewards.scores import Scores, details_arrays


class InProcessRewards:
    """Scores rollouts with scorers built in this process from `reward.scorers`."""

    def __init__(self, config: RewardConfig) -> None:
        self.config = config
        self.scorers = {}
        for sc in config.scorers:
            try:
                self.scorers[sc.name] = build_scorer(sc.name, **sc.kwargs)
            except (KeyError, ValueError) as err:
                raise UserError(f"reward.scorers: {err.args[0]}") from err

    def score(self, rollout: Rollout) -> Scores:
        masks = None if rollout.masks is None else list(rollout.masks.cpu().numpy())
        meta = rollout.metadata
        batch = ScoreBatch(
            rollout.edited_uint8(), rollout.sources_uint8(), rollout.instructions, masks=masks, metadata=meta
        )
        values, errors, details = {}, {}, {}
        for name, scorer in self.scorers.items():
            parts, errs, dets = [], [], []
            step = max(1, int(scorer.max_batch_size))
            for start in range(0, len(batch), step):
                sl = slice(start, start + step)
                sub = ScoreBatch(
                    batch.edited[sl],
                    batch.sources[sl],
                    batch.instructions[sl],
                    None if masks is None else masks[sl],
                    metadata=None if meta is None else meta[sl],
                )
                result = scorer.score(sub)
                parts.append(result.scores)
                errs.extend(result.errors)
                dets.extend(result.details)
            v = np.concatenate(parts)
            values[name] = v if scorer.higher_is_better else -v
            errors[name] = errs
            details.update(details_arrays(name, dets))
        return Scores(values, errors, details)

    def metrics(self) -> dict[str, int]:
        """Nothing is counted in process (the queue transport reports resubmissions and errors)."""
        return {}

    def close(self) -> None:
        self.scorers.clear()
