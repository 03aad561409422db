"""From scores to learning signals: call the configured scorers and combine their scores.

`InProcessRewards` runs the scorers inside the trainer process (the single-machine path). The
`RewardClient` of the queue fabric offers the same `score(rollout)` method over Redis.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from reward_servers.base import ScoreBatch, build_scorer
from sampler.rollout import Rollout
from trainer.config import RewardConfig, TrainConfig
from trainer.errors import UserError
from trainer.objectives import standardize


@dataclass
class Scores:
    """Scores of N edits by S scorers, oriented so that higher is better.

    Attributes:
        values: scorer name -> (N,) float64.
        errors: scorer name -> N entries, None or the item's error message.
        details: "<scorer>.<detail>" -> (N,) float64 of the scorers' named per-item numbers (e.g.
            "oracle_edit.success"), NaN where an item has none; logged, not trained on.
    """

    values: dict[str, np.ndarray]
    errors: dict[str, list[str | None]]
    details: dict[str, np.ndarray] = field(default_factory=dict)

    def select(self, keep: list[int]) -> Scores:
        """The scores of items `keep`."""
        return Scores(
            {k: v[keep] for k, v in self.values.items()},
            {k: [e[i] for i in keep] for k, e in self.errors.items()},
            {k: v[keep] for k, v in self.details.items()},
        )

    def failed(self) -> list[tuple[str, int, str]]:
        return [
            (name, i, e) for name, errs in self.errors.items() for i, e in enumerate(errs) if e is not None
        ]


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

    def close(self) -> None:
        self.scorers.clear()


def details_arrays(scorer: str, per_item: list[dict[str, float]]) -> dict[str, np.ndarray]:
    """N dicts of named numbers -> {"<scorer>.<name>": (N,) float64}, NaN where an item lacks one."""
    names = sorted({k for d in per_item for k in d})
    return {
        f"{scorer}.{k}": np.array([float(d.get(k, np.nan)) for d in per_item], dtype=np.float64)
        for k in names
    }


def reconstruction_mse(rollout: Rollout) -> torch.Tensor | None:
    """(N,) SPIE's reconstruction term: MSE between edit and source outside the edit mask (None without masks).

    As SPIE's `semantic_score` (reward_modeling/score_functions.py, lines 117-124): squared error
    averaged over the channels, then over the pixels outside the mask; where the mask covers the
    whole image (or nothing), over all pixels.
    """
    if rollout.masks is None:
        return None
    keep = (~rollout.masks.bool()).to(rollout.images.device)  # (N, H, W)
    empty = ~keep.flatten(1).any(dim=1)
    keep[empty] = True
    keep = keep.unsqueeze(1).float()  # (N, 1, H, W)
    sq = ((rollout.images - rollout.sources) ** 2).mean(dim=1, keepdim=True) * keep
    return (sq.sum(dim=(1, 2, 3)) / keep.sum(dim=(1, 2, 3))).cpu().double()


def sampling_batches(rollout: Rollout) -> list[torch.Tensor]:
    """Index tensors of the rollout's sampling batches (shards), from the item ids "e<E>-b<B>-i<I>";
    the whole rollout as one batch when the ids do not say."""
    keys = []
    for item in rollout.item_ids:
        parts = item.split("-")
        if len(parts) != 3 or not parts[1].startswith("b"):
            return [torch.arange(len(rollout))]
        keys.append(parts[0] + "-" + parts[1])
    if len(keys) != len(rollout):
        return [torch.arange(len(rollout))]
    order = list(dict.fromkeys(keys))
    return [torch.tensor([i for i, k in enumerate(keys) if k == key]) for key in order]


def standardize_per_batch(x: torch.Tensor, batches: list[torch.Tensor]) -> torch.Tensor:
    """(N,) standardised within each sampling batch (SPIE standardises each gathered sampling batch)."""
    out = torch.zeros_like(x)
    for idx in batches:
        out[idx] = standardize(x[idx])
    return out


def ppo_rewards(config: RewardConfig, scores: Scores) -> torch.Tensor:
    """(N,) scalar reward: the single scorer's raw score, or the weighted sum of standardised scores."""
    if len(config.scorers) == 1:
        return torch.from_numpy(scores.values[config.scorers[0].name]).double()
    return sum(sc.weight * standardize(torch.from_numpy(scores.values[sc.name])) for sc in config.scorers)


def spie_signals(
    config: RewardConfig, train: TrainConfig, scores: Scores, rollout: Rollout
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(structural, semantic) per-edit signals for SPIE's ranking, as SPIE computes them.

    SPIE (scripts/train.py, lines 343-359; reward_modeling/score_functions.py, line 127): the
    semantic score gets `rec_lambda` x the RAW reconstruction MSE outside the edit mask (SPIE's scores
    are distances, lower is better, so it adds; ours are oriented higher-is-better, so we subtract),
    and then each score is standardised once, over its sampling batch. Each scorer of a role gives
    `weight` x that standardised score (weight 1 and one scorer per role is exactly SPIE); several
    scorers of one role are summed. `ranking_from_scores` adds them without standardising again.
    """
    batches = sampling_batches(rollout)
    rec = reconstruction_mse(rollout) if train.rec_lambda > 0 else None
    out = {}
    for role in ("structural", "semantic"):
        parts = []
        for sc in config.scorers:
            if sc.role != role:
                continue
            raw = torch.from_numpy(scores.values[sc.name]).double()
            if role == "semantic" and rec is not None:
                raw = raw - train.rec_lambda * rec
            parts.append(sc.weight * standardize_per_batch(raw, batches))
        if role == "semantic" and not parts and rec is not None:
            parts.append(standardize_per_batch(-train.rec_lambda * rec, batches))
        out[role] = torch.stack(parts).sum(0) if parts else None
    return out["structural"], out["semantic"]
