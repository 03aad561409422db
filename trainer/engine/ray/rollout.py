"""The rollout workers as one pool: placed as a gang, kept on the learner's weights, sampling shards
and redoing a dead worker's share."""

from __future__ import annotations

import time
from collections.abc import Iterator

import ray
import torch
from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError
from ray.util.placement_group import remove_placement_group

from sampler.rollout import Rollout
from sampler.step_pool import StepPool
from trainer.config import Config
from trainer.engine.ray.placement import bundle, in_bundle, place_gang
from trainer.engine.ray.workers import RolloutWorker
from trainer.engine.shards import Shard


def worker_bundle(config: Config) -> dict[str, float]:
    """The resources one rollout worker reserves (a placement-group bundle)."""
    r = config.ray
    return bundle(r.num_cpus_per_worker, r.num_gpus_per_worker, r.worker_resources)


class RolloutPool:
    """The rollout workers, placed as one gang, with the weights they should hold.

    Args:
        config: the run configuration (`config.ray` sizes the pool).
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        r = config.ray
        n = r.num_rollout_workers
        self.pg = place_gang(
            "rollout worker(s)", n, worker_bundle(config), r.placement_strategy, r.start_timeout_s
        )
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
                scheduling_strategy=in_bundle(self.pg, i),
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

    def sample_pools(self, shards: list[Shard]) -> Iterator[StepPool]:
        """SPO: every shard sampled with its pools, one task per shard, round robin over the workers
        (all submitted at once); yields each `StepPool` in shard order as soon as it is in, so the
        driver judges a shard's candidates while the workers sample the next. A shard lost with its
        worker is sampled again once the worker is back, as in `gather`."""
        r = self.config.ray
        n = len(self.workers)
        refs = [self.workers[i % n].sample_pools.remote(sh, self.version) for i, sh in enumerate(shards)]
        deadline = time.monotonic() + r.rollout_timeout_s
        for i, shard in enumerate(shards):
            k, attempts = i % n, 0
            while True:
                try:
                    pool = ray.get(refs[i], timeout=max(0.0, deadline - time.monotonic()))
                    break
                except GetTimeoutError as err:
                    raise RuntimeError(
                        f"rollout worker {k} gave no pools for shard {shard.index} within "
                        f"ray.rollout_timeout_s={r.rollout_timeout_s:.0f}s; not training on a partial batch"
                    ) from err
                except RayActorError as err:
                    attempts += 1
                    if r.max_restarts != -1 and attempts > r.max_restarts:
                        raise RuntimeError(
                            f"rollout worker {k} died {attempts} times on shard {shard.index} "
                            f"(ray.max_restarts={r.max_restarts}); not training on a partial batch"
                        ) from err
                    self._await_restart(k, deadline)
                    self.restarts += 1
                    print(
                        f"[spie] rollout worker {k} died and was restarted; sampling shard {shard.index} again"
                    )
                    refs[i] = self.workers[k].sample_pools.remote(shard, self.version)
            refs[i] = None  # the pool's tensors are the caller's now
            yield pool

    def sample(self, shards: list[Shard]) -> Rollout:
        """Sample every shard and concatenate the rollouts in shard order."""
        return self.gather(self.submit(shards))

    def close(self) -> None:
        for w in self.workers:
            ray.kill(w)
        remove_placement_group(self.pg)
