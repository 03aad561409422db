"""Scoring in the trainer process: the configured scorers are built here and called batch by batch.

The queue fabric's `RewardClient` (`trainer.rewards.queue`) offers the same `score(rollout)` over Redis.
"""

from __future__ import annotations

import numpy as np

from reward_servers.base import ScoreBatch, Scorer, ScoreResult, build_scorer
from sampler.rollout import Rollout
from trainer.config import RewardConfig
from trainer.errors import UserError
from trainer.rewards.scores import Scores, details_arrays, texts_lists


def build_scorers(config: RewardConfig) -> dict[str, Scorer]:
    """The scorers of `reward.scorers`, built in this process (name -> scorer)."""
    scorers = {}
    for sc in config.scorers:
        try:
            scorers[sc.name] = build_scorer(sc.name, **sc.kwargs)
        except (KeyError, ValueError) as err:
            raise UserError(f"reward.scorers: {err.args[0]}") from err
    return scorers


def call_scorers(scorers: dict[str, Scorer], batch: ScoreBatch) -> dict[str, ScoreResult]:
    """Every scorer on all N items of `batch`, in chunks of at most its `max_batch_size`.

    The one in-process scoring loop (training and evaluation). Scores keep the scorer's own
    orientation; N per-item errors, details and texts come back with them.
    """
    out = {}
    for name, scorer in scorers.items():
        parts, errs, dets, texts = [], [], [], []
        step = max(1, int(scorer.max_batch_size))
        for start in range(0, len(batch), step):
            sl = slice(start, start + step)
            result = scorer.score(
                ScoreBatch(
                    batch.edited[sl],
                    batch.sources[sl],
                    batch.instructions[sl],
                    None if batch.masks is None else batch.masks[sl],
                    metadata=None if batch.metadata is None else batch.metadata[sl],
                )
            )
            parts.append(result.scores)
            errs.extend(result.errors)
            dets.extend(result.details)
            texts.extend(result.texts)
        out[name] = ScoreResult(np.concatenate(parts), dets, errs, texts=texts)
    return out


class InProcessRewards:
    """Scores rollouts with scorers built in this process from `reward.scorers`."""

    def __init__(self, config: RewardConfig) -> None:
        self.config = config
        self.scorers = build_scorers(config)

    def score(self, rollout: Rollout) -> Scores:
        masks = None if rollout.masks is None else list(rollout.masks.cpu().numpy())
        batch = ScoreBatch(
            rollout.edited_uint8(),
            rollout.sources_uint8(),
            rollout.instructions,
            masks=masks,
            metadata=rollout.metadata,
        )
        values, errors, details, texts = {}, {}, {}, {}
        for name, result in call_scorers(self.scorers, batch).items():
            values[name] = result.scores if self.scorers[name].higher_is_better else -result.scores
            errors[name] = result.errors
            details.update(details_arrays(name, result.details))
            texts.update(texts_lists(name, result.texts))
        return Scores(values, errors, details, texts)

    def metrics(self) -> dict[str, int]:
        """Nothing is counted in process (the queue transport reports resubmissions and errors)."""
        return {}

    def close(self) -> None:
        self.scorers.clear()
