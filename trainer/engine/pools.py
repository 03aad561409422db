"""SPO's sampling of one shard: `sampler.step_pool` on the shard's inputs, from the shard's own stream."""

from __future__ import annotations

from collections.abc import Callable

import torch

from sampler.rollout import Rollout
from sampler.step_pool import StepPool, step_pool_rollout
from trainer.config import Config
from trainer.engine.shards import Shard


def pool_generator(shard: Shard) -> torch.Generator:
    """The shard's SPO stream: seeded by a draw from the shard's noise state. A pooled chain draws
    K times the noise of a plain one, more than `plan_epoch` sets aside per shard, so each shard gets a
    stream of its own (a pure function of seed, epoch and shard, as the plain rollout's)."""
    g = torch.Generator()
    g.set_state(shard.noise_state)
    return torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=g)))


def sample_pool_shard(
    policy, shard: Shard, config: Config, on_step: Callable[[Rollout], None], policy_version: int = 0
) -> StepPool:
    """The shard's M inputs sampled with SPO's pools (`train.spo`); `on_step` gets each step's
    candidates, item ids "e<epoch>-b<shard>-s<step>-i<i>"; the final chains get "e<epoch>-b<shard>-i<m>"."""
    o = config.train.spo
    meta = getattr(shard.inputs, "metadata", None)

    def named(candidates: Rollout) -> None:
        step = int(candidates.step_index[0, 0])
        candidates.item_ids = [f"e{shard.epoch}-b{shard.index}-s{step}-i{i}" for i in range(len(candidates))]
        on_step(candidates)

    with policy.eval_mode():
        pool = step_pool_rollout(
            policy,
            shard.inputs.sources,
            shard.inputs.instructions,
            o.pool_size,
            pool_generator(shard),
            start_step=o.start_step,
            exemplars=shard.inputs.exemplars,
            masks=shard.inputs.masks,
            metadata=[dict(m) for m in meta] if meta is not None else None,
            on_step=named,
            policy_version=policy_version,
            judge_steps=o.judge_steps,
        )
    pool.final.item_ids = [f"e{shard.epoch}-b{shard.index}-i{i}" for i in range(len(pool.final))]
    return pool
