"""The Ray engine: the driver (this process, the single controller) hands sampling and learning to
actors, and keeps scoring, advantages, metrics and checkpoints for itself.

One epoch with `ray.enabled`:
1. the driver draws the epoch's shards (`trainer.engine.shards.plan_epoch`) and splits them over the
   rollout workers (round robin); each shard carries the generator state its noise starts from,
   so the edits are the single-process loop's whatever the number of workers;
2. it gathers the workers' rollouts, in shard order, into one `Rollout`. A worker that dies is
   restarted by Ray (`ray.max_restarts`), sent the current weights, and samples its share again; if
   it cannot, the run stops: a partial batch is never trained on;
3. the loop scores the whole batch and computes advantages or rankings over all of it;
4. the learner actors train, each on its share of whole groups, their gradients averaged over a
   torch.distributed process group when there are several (`trainer.engine.ray.learners`); rank 0's new
   trainable weights (LoRA only, with LoRA) are put in the object store once and every worker loads
   them from there.

With `train.objective: spo` the workers sample each shard with its pools and return every step's
candidates for the driver to judge (`sample_pool_shards`); with `alignprop` the learners sample,
score and train in one pass (`learn_by_reward`), each with its own differentiable reward, and only
the weight sync of step 4 follows.
"""

from __future__ import annotations

import contextlib
import os
import time

import ray
import torch

from sampler.rollout import Rollout
from trainer.config import Config
from trainer.engine.ray.learners import LearnerGroup
from trainer.engine.ray.rollout import RolloutPool
from trainer.engine.shards import Shard
from trainer.errors import UserError


def connect(config: Config) -> bool:
    """Join `ray.address` (or RAY_ADDRESS), or start a local Ray; True if this call started it."""
    if ray.is_initialized():
        return False
    # A job submitted to a cluster gets the cluster's address in RAY_ADDRESS: join it (starting a
    # single-node Ray on loopback there would not find the cluster's raylet).
    address = config.ray.address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        # A local Ray for this run: no dashboard (its job API runs code for whoever reaches it).
        # Its processes listen on loopback only: nothing off this machine can reach them.
        with _single_node():
            ray.init(include_dashboard=False, log_to_driver=True, _node_ip_address="127.0.0.1")
        return True
    # A Ray Client head (ray://) can refuse a client while it is still starting ("Starting Ray
    # client server failed" before its runtime-env agent is up): try again, 5 s apart, for up to
    # a minute (or `ray.start_timeout_s`); any other address fails at once. Then one line.
    retry_s = min(60.0, config.ray.start_timeout_s) if address.startswith("ray://") else 0.0
    deadline = time.monotonic() + retry_s
    while True:
        try:
            ray.init(address=address, log_to_driver=True)
            return True
        except ConnectionError as err:
            if time.monotonic() + 5 > deadline:
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise UserError(f"ray.address={address!r}: cannot join the Ray cluster ({first})") from err
            print(f"[spie] ray: cannot join {address} yet ({type(err).__name__}); retrying in 5 s")
            time.sleep(5)


@contextlib.contextmanager
def _single_node():
    """Keep the node address of a Ray started here on loopback. `ray.init` replaces a loopback
    `_node_ip_address` by the machine's address (then the GCS, raylet, agents and workers listen
    on every interface) unless Ray runs single-node: `ray._private.ray_constants.ENABLE_RAY_CLUSTER`
    false, read from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER by each process at import (Ray 2.x; the same
    as `trainer.cluster.launcher.RAY_LOOPBACK_ENV`). Set for this process and the ones it starts,
    then restored."""
    from ray._private import ray_constants

    previous = os.environ.get(_SINGLE_NODE), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_NODE] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous[1]
        if previous[0] is None:
            os.environ.pop(_SINGLE_NODE, None)
        else:
            os.environ[_SINGLE_NODE] = previous[0]


_SINGLE_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class RayEngine:
    """`trainer.loop.LocalEngine`'s methods, run on learner actors and a pool of rollout workers."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_ray = connect(config)
        self.pool = self.learners = None
        try:
            # The rollout gang is placed first, so the learners cannot take a slot it needs.
            self.pool = RolloutPool(config)
            self.learners = LearnerGroup(config)
            self.latent_shape = tuple(self.pool.placement[0]["latent_shape"])
            nodes = len({p["node_id"] for p in self.pool.placement})
            n = len(self.learners)
            learners = "1 learner" if n == 1 else f"{n} data-parallel learners"
            print(f"[spie] ray: {len(self.pool.workers)} rollout worker(s) on {nodes} node(s), {learners}")
            self.version = 0
            self.last_sync_s = self._sync_weights()
        except BaseException:
            self.close()
            raise

    def _sync_weights(self) -> float:
        state, self.version = self.learners.trainable_state()
        return self.pool.push_weights(state, self.version)

    def restore(self, trainable: dict[str, torch.Tensor], optimizer: dict, version: int) -> None:
        self.learners.restore(trainable, optimizer, version)
        self._sync_weights()

    def sample(self, shards: list[Shard], progress: bool) -> Rollout:
        return self.pool.sample(shards)

    def learn(self, rollout: Rollout, generator: torch.Generator, progress: bool) -> dict:
        """Train on the whole gathered batch (split between the learners), then send rank 0's new
        weights to every worker."""
        metrics, self.version = self.learners.train(rollout, generator.get_state())
        self.last_sync_s = self._sync_weights()
        return metrics

    def sample_pools(self, shard: Shard, on_step, progress: bool):
        """SPO: one shard sampled with its pools on a rollout worker (`sample_pool_shards`)."""
        return next(iter(self.sample_pool_shards([shard], on_step, progress)))

    def sample_pool_shards(self, shards: list[Shard], on_step, progress: bool):
        """SPO: the shards sampled with their pools on the rollout workers, all at once; yields each
        shard's `StepPool` in shard order, after handing `on_step` its steps' candidates in order.

        The workers return every step's candidates and the driver judges them (`trainer.stepwise`):
        SPO's chain goes on from a uniformly drawn candidate whatever the judge says, so a worker
        never waits for scores. Judging stays with the run's one reward transport, which batches
        each step's K x M candidates (and, with `sample.pipeline: async`, the steps of every shard
        that arrive while a call is in flight) across all workers; no scorer is copied into a
        worker, and the pairs are the local engine's."""
        for pool in self.pool.sample_pools(shards):
            for candidates in pool.candidates:
                on_step(candidates)
            yield pool

    def learn_by_reward(self, shards: list[Shard], reward, generator: torch.Generator, progress: bool):
        """AlignProp on the learners (`LearnerGroup.learn_by_reward`): (edits, scores, numbers).

        `reward` is the driver's differentiable reward; only its `spec` (plain values) travels: each
        learner builds its own from the config and the spec. K for every shard is drawn here from
        the epoch generator, in shard order, as the local engine draws it. Then rank 0's new weights
        go to the rollout workers."""
        from trainer.engine.alignprop import draw_backprop_steps

        spec = getattr(reward, "spec", None)
        if spec is None:
            raise UserError("train.objective=alignprop with ray.enabled: this reward transport has no spec")
        ks = draw_backprop_steps(self.config, len(shards), generator)
        rollout, scores, metrics, self.version = self.learners.learn_by_reward(shards, spec, ks)
        self.last_sync_s = self._sync_weights()
        return rollout, scores, metrics

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        return self.learners.checkpoint_state()

    def metrics(self) -> dict[str, float]:
        return {
            "rollout_workers": float(len(self.pool.workers)),
            "rollout_worker_restarts": float(self.pool.restarts),
            "learners": float(len(self.learners)),
            "time_weight_sync_s": self.last_sync_s,
        }

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self.learners is not None:
            self.learners.close()
        if self.started_ray:
            ray.shutdown()
