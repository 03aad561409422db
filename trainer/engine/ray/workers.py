"""The Ray actors of a training run: rollout workers that sample, and the learners that train.

Each is a plain class with a few coarse methods; `trainer.engine.ray.engine` wraps them with `ray.remote`
and the resource counts from `config.ray`, so the same code runs with `num_gpus=0` on a laptop.
Batches travel as `sampler.rollout.Rollout`, the one batch type, through the object store.
"""

from __future__ import annotations

import os

import torch

from sampler.rollout import Rollout
from trainer.config import Config
from trainer.engine.learner import Learner
from trainer.engine.policy import build_policy, drop_text_encoders, load_trainable_into_policy
from trainer.engine.pools import sample_pool_shard
from trainer.engine.ray.distributed import (
    DistributedLearner,
    backend_for,
    join_process_group,
    open_rendezvous,
)
from trainer.engine.shards import Shard, latent_shape, sample_shard


class StaleWeightsError(RuntimeError):
    """A rollout was asked of a worker that does not hold the expected policy version."""


def set_threads(config: Config) -> None:
    """Apply `ray.torch_threads` in this actor process (0 leaves Ray's one thread per reserved CPU)."""
    if config.ray.torch_threads > 0:
        torch.set_num_threads(config.ray.torch_threads)


class RolloutWorker:
    """Samples shards of an epoch with its own copy of the policy (one per GPU).

    Args:
        config: the run configuration.
        rank: the worker's index, for logs.
    """

    def __init__(self, config: Config, rank: int) -> None:
        self.config = config
        self.rank = rank
        set_threads(config)
        self.policy = build_policy(config)
        self.version = -1  # no weights pushed yet

    def ready(self) -> dict:
        """Where the worker runs: {"rank", "pid", "node_id", "device", "latent_shape"}."""
        import ray

        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "device": str(self.policy.device),
            "latent_shape": latent_shape(self.policy, self.config.model.resolution),
        }

    def set_weights(self, state: dict[str, torch.Tensor], version: int) -> int:
        """Load the learner's trainable weights (name -> tensor) as policy `version`."""
        load_trainable_into_policy(self.policy, state, self.config.model.use_lora)
        self.version = version
        return version

    def rollout(self, shards: list[Shard], version: int) -> list[Rollout]:
        """Sample each shard (batch_size x nb_gen edits each), tagged with the policy version.

        Refuses to sample with weights other than `version`: a restarted worker must be sent the
        current weights first, never sample silently with the base model.
        """
        if self.version != version:
            raise StaleWeightsError(f"rollout worker {self.rank} holds version {self.version}, not {version}")
        return [sample_shard(self.policy, sh, self.config, False, self.version) for sh in shards]

    def sample_pools(self, shard: Shard, version: int):
        """SPO: the shard sampled with a pool of candidates per step (`trainer.engine.pools`), as one
        `sampler.step_pool.StepPool` (the final chains and every step's candidates); the driver
        judges the candidates. Refuses weights other than `version`, as `rollout` does."""
        if self.version != version:
            raise StaleWeightsError(f"rollout worker {self.rank} holds version {self.version}, not {version}")
        return sample_pool_shard(self.policy, shard, self.config, lambda candidates: None, self.version)


class LearnerActor:
    """Wraps `trainer.learner.Learner`: owns the trained weights and the optimizer.

    With `world_size` > 1 it is rank `rank` of the data-parallel learners (`trainer.engine.ray.distributed`): the driver
    asks rank 0 to `listen`, then every rank to `join` the process group.

    Args:
        config: the run configuration.
        rank: this learner's rank.
        world_size: the number of learners.
    """

    def __init__(self, config: Config, rank: int = 0, world_size: int = 1) -> None:
        self.config, self.rank, self.world_size = config, rank, world_size
        set_threads(config)
        policy = build_policy(config)
        self.learner = (DistributedLearner if world_size > 1 else Learner)(config, policy)
        # Rollout workers encode the instructions; a learner that trains on what they recorded
        # drops its text encoders (the local engine's one policy samples too, and keeps them).
        if not self.learner.objective.learner_reads_text:
            drop_text_encoders(policy)
        self.listener = None
        self.reward, self.reward_spec = None, None  # AlignProp's differentiable reward, built here

    def ready(self) -> dict:
        """Where the learner runs: {"rank", "pid", "node_id", "node_ip", "device"}."""
        import ray

        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "device": str(self.learner.policy.device),
        }

    def listen(self, host: str) -> tuple[str, int]:
        """Rank 0: open the rendezvous on `host` ("auto": this node's address); returns (host, port)."""
        import ray

        if host == "auto":
            host = ray.util.get_node_ip_address()
        self.listener = open_rendezvous(host)
        return host, self.listener.getsockname()[1]

    def join(self, host: str, port: int, timeout_s: float) -> None:
        """Join the learners' process group (gloo on CPU, NCCL on GPU); weights start from rank 0's."""
        backend = backend_for(self.learner.policy.device)
        join_process_group(self.rank, self.world_size, host, port, backend, timeout_s, self.listener)
        self.listener = None
        self.learner.broadcast_weights(0)

    def train(
        self,
        rollout: Rollout,
        generator_state: torch.Tensor,
    ) -> tuple[dict[str, float], int]:
        """One epoch of updates (see `Learner.train`); returns (metrics, the new policy version).

        `rollout` is this learner's share (whole groups; the whole batch with one learner), with its
        per-edit advantages or ranks. `generator_state` is the driver's
        epoch generator state, so with one learner the shuffles are the ones the single-process
        loop draws; every rank uses it to shuffle its own share.
        """
        gen = torch.Generator()
        gen.set_state(generator_state)
        metrics = self.learner.train(rollout, gen)
        return metrics, self.learner.version

    def learn_by_reward(self, shards: list[Shard], reward_spec: dict, ks: list[int]) -> tuple:
        """One epoch of AlignProp on this learner's shards (`trainer.engine.alignprop`), gradients
        averaged over the learners before each optimizer step. The differentiable reward is built
        here, once, from the config and `reward_spec` (`trainer.rewards.differentiable.
        gradient_rewards_from_spec`: its own scorers, or its own client of the run's servers).

        Args:
            shards: this learner's sampling batches; ks: each one's K (drawn by the driver).

        Returns:
            (the edits as a detached `Rollout`, their `Scores`, the update's numbers, the new version).
        """
        from trainer.engine.alignprop import alignprop_epoch
        from trainer.rewards.differentiable import gradient_rewards_from_spec

        if self.reward is None or reward_spec != self.reward_spec:
            self.close_reward()
            self.reward = gradient_rewards_from_spec(self.config, reward_spec)
            self.reward_spec = reward_spec
        rollout, scores, stats = alignprop_epoch(self.learner, shards, self.reward, None, ks=ks)
        return rollout, scores, stats, self.learner.version

    def close_reward(self) -> None:
        if self.reward is not None:
            self.reward.close()
        self.reward = None

    def trainable_state(self) -> tuple[dict[str, torch.Tensor], int]:
        """(name -> CPU tensor of every trained weight, its policy version)."""
        return self.learner.trainable_state(), self.learner.version

    def optimizer_state(self) -> dict:
        return self.learner.optimizer_checkpoint()

    def restore(self, trainable: dict[str, torch.Tensor], optimizer: dict, version: int) -> None:
        """Load a checkpoint's weights, optimizer state and policy version (every rank loads it)."""
        self.learner.load_trainable_state(trainable)
        self.learner.load_optimizer_checkpoint(optimizer)
        self.learner.version = version
