"""The Ray engine: the driver (this process, the single controller) hands sampling and learning to
actors, and keeps scoring, advantages, metrics and checkpoints for itself.

One epoch with `ray.enabled`:
1. the driver draws the epoch's shards (`trainer.loop.plan_epoch`) and splits them over the
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
"""

from __future__ import annotations

import time

import ray
import torch
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from sampler.rollout import Rollout
from trainer.config import Config
from trainer.engine.ray.learners import LearnerGroup
from trainer.engine.ray.workers import RolloutWorker
from trainer.engine.shards import Shard
from trainer.errors import UserError


def connect(config: Config) -> bool:
    """Join `ray.address` (or RAY_ADDRESS), or start a local Ray; True if this call started it."""
    if ray.is_initialized():
        return False
    address = config.ray.address or None
    if not address:
        # A local Ray for this run: no dashboard (its job API runs code for whoever reaches it).
        # Its processes listen on loopback only: nothing off this machine can reach them.
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


def worker_bundle(config: Config) -> dict[str, float]:
    """The resources one rollout worker reserves (a placement-group bundle)."""
    r = config.ray
    bundle = {"CPU": r.num_cpus_per_worker, "GPU": r.num_gpus_per_worker, **r.worker_resources}
    return {k: float(v) for k, v in bundle.items() if v}


class RolloutPool:
    """The rollout workers, placed as one gang, with the weights they should hold.

    Args:
        config: the run configuration (`config.ray` sizes the pool).
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        r = config.ray
        n = r.num_rollout_workers
        self.pg = placement_group([worker_bundle(config)] * n, strategy=r.placement_strategy)
        try:
            ray.get(self.pg.ready(), timeout=r.start_timeout_s)
        except GetTimeoutError as err:
            remove_placement_group(self.pg)
            raise UserError(
                f"ray: the cluster cannot place {n} rollout worker(s) of {worker_bundle(config)} "
                f"({r.placement_strategy}) within {r.start_timeout_s:.0f}s; it has "
                f"{ray.cluster_resources()}"
            ) from err
        actor = ray.remote(RolloutWorker)
        self.workers: list = []
        try:
            self._start(actor, n)
        except BaseException:
            self.close()
            raise
        self.weights: ray.ObjectRef | None = None
        self.version = -1
        self.restarts = 0  # shares sampled again after a worker died, over the run

    def _start(self, actor, n: int) -> None:
        r = self.config.ray
        config = self.config
        self.workers = [
            actor.options(
                num_cpus=r.num_cpus_per_worker,
                num_gpus=r.num_gpus_per_worker,
                resources=dict(r.worker_resources),
                max_restarts=r.max_restarts,
                max_task_retries=0,  # the pool redoes a lost share itself, after re-sending weights
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(config, i)
            for i in range(n)
        ]
        self.placement = ray.get([w.ready.remote() for w in self.workers], timeout=r.start_timeout_s)

    def push_weights(self, state: dict[str, torch.Tensor], version: int) -> float:
        """Put the trainable weights in the object store once; every worker loads them. Returns seconds."""
        t0 = time.perf_counter()
        self.weights, self.version = ray.put(state), version
        pending = [w.set_weights.remote(self.weights, version) for w in self.workers]
        ray.get(pending, timeout=self.config.ray.start_timeout_s)
        return time.perf_counter() - t0

    def _submit(self, k: int, shards: list[Shard]) -> ray.ObjectRef:
        return self.workers[k].rollout.remote(shards, self.version)

    def submit(self, shards: list[Shard]) -> dict:
        """Start sampling every shard, round robin over the workers; `gather` collects the result."""
        n = len(self.workers)
        share = {k: shards[k::n] for k in range(n) if shards[k::n]}
        pending = {self._submit(k, part): k for k, part in share.items()}
        return {"shards": shards, "share": share, "pending": pending}

    def gather(self, job: dict) -> Rollout:
        """Wait for a `submit`ted epoch; a share lost with its worker is sampled again once the worker
        is back. Returns the shards' rollouts concatenated in shard order, or raises: never a part."""
        r = self.config.ray
        share, pending = job["share"], job["pending"]
        attempts = dict.fromkeys(share, 0)
        results: dict[int, Rollout] = {}
        deadline = time.monotonic() + r.rollout_timeout_s
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise RuntimeError(
                    f"rollout worker(s) {sorted(pending.values())} gave no result within "
                    f"ray.rollout_timeout_s={r.rollout_timeout_s:.0f}s; not training on a partial batch"
                )
            k = pending.pop(ready[0])
            try:
                parts = ray.get(ready[0])
            except RayActorError as err:
                attempts[k] += 1
                if r.max_restarts != -1 and attempts[k] > r.max_restarts:
                    raise RuntimeError(
                        f"rollout worker {k} died {attempts[k]} times this epoch (ray.max_restarts="
                        f"{r.max_restarts}); not training on a partial batch"
                    ) from err
                self._await_restart(k, deadline)
                self.restarts += 1
                print(f"[spie] rollout worker {k} died and was restarted; sampling its share again")
                pending[self._submit(k, share[k])] = k
                continue
            for shard, part in zip(share[k], parts, strict=True):
                results[shard.index] = part
        missing = [sh.index for sh in job["shards"] if sh.index not in results]
        if missing:
            raise RuntimeError(f"rollouts missing for shards {missing}; not training on a partial batch")
        return Rollout.concat([results[sh.index] for sh in job["shards"]])

    def _await_restart(self, k: int, deadline: float) -> None:
        """Wait until Ray has restarted worker k, then send it the current weights; raises
        RuntimeError if it is gone for good or not back by the deadline."""
        while True:
            try:
                remaining = max(0.1, deadline - time.monotonic())
                ray.get(self.workers[k].set_weights.remote(self.weights, self.version), timeout=remaining)
                return
            except ActorUnavailableError:  # restarting: ask again shortly
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            except (RayActorError, GetTimeoutError) as err:
                raise RuntimeError(
                    f"rollout worker {k} died and did not come back ({type(err).__name__}); "
                    "not training on a partial batch"
                ) from err
        raise RuntimeError(f"rollout worker {k} was not restarted in time; not training on a partial batch")

    def sample(self, shards: list[Shard]) -> Rollout:
        """Sample every shard and concatenate the rollouts in shard order."""
        return self.gather(self.submit(shards))

    def close(self) -> None:
        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.pg)


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
