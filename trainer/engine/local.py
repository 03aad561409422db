"""The local engine: sampling and learning in this process, one policy that both samples and trains."""

from __future__ import annotations

import torch

from sampler.rollout import Rollout
from trainer.config import Config
from trainer.engine.learner import Learner
from trainer.engine.policy import build_policy
from trainer.engine.pools import sample_pool_shard
from trainer.engine.shards import Shard, latent_shape, sample_shard


class LocalEngine:
    """Sampling and learning in this process: one policy that both samples and trains (the default).

    `trainer.ray_loop.RayEngine` has the same methods and runs them on Ray actors instead.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.policy = build_policy(config)
        self.learner = Learner(config, self.policy)
        self.latent_shape = latent_shape(self.policy, config.model.resolution)

    @property
    def version(self) -> int:
        return self.learner.version

    def restore(self, trainable: dict[str, torch.Tensor], optimizer: dict, version: int) -> None:
        self.learner.load_trainable_state(trainable)
        self.learner.load_optimizer_checkpoint(optimizer)
        self.learner.version = version

    def sample(self, shards: list[Shard], progress: bool) -> Rollout:
        parts = [sample_shard(self.policy, sh, self.config, progress, self.version) for sh in shards]
        return Rollout.concat(parts)

    def sample_pools(self, shard: Shard, on_step, progress: bool):
        """SPO: one shard sampled with a pool of candidates per step (`trainer.engine.pools`)."""
        return sample_pool_shard(self.policy, shard, self.config, on_step, self.version)

    def sample_pool_shards(self, shards: list[Shard], on_step, progress: bool):
        """SPO: each shard's pools in turn (yielded as sampled, so `on_step` runs as the chain goes)."""
        for shard in shards:
            yield self.sample_pools(shard, on_step, progress)

    def learn(self, rollout: Rollout, generator: torch.Generator, progress: bool) -> dict:
        """One epoch of updates on a batch that carries its advantages or ranks."""
        return self.learner.train(rollout, generator, progress=progress)

    def learn_by_reward(self, shards: list[Shard], reward, generator: torch.Generator, progress: bool):
        """One epoch of AlignProp (`train.objective: alignprop`): (rollout, scores, update numbers)."""
        from trainer.engine.alignprop import alignprop_epoch

        return alignprop_epoch(self.learner, shards, reward, generator, progress)

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(trainable weights, optimizer state) for `save_checkpoint`."""
        return self.learner.trainable_state(), self.learner.optimizer_checkpoint()

    def metrics(self) -> dict[str, float]:
        """Engine-specific numbers for the epoch's metrics record."""
        return {}

    def close(self) -> None:
        pass
