"""The learners of a Ray run, seen from the driver: one `LearnerActor`, or several data-parallel ones.

With `ray.num_learners` = N > 1, the driver
1. places N learner actors as one gang (a placement group, `ray.learner_placement_strategy`);
2. asks rank 0 to open a rendezvous on `ray.learner_host` (127.0.0.1 by default) and every rank to
   join one torch.distributed process group (gloo on CPU, NCCL on GPU);
3. each epoch, splits the gathered batch, whose advantages or rankings it has computed over all of
   it, into N contiguous shares of whole groups (`split_for_learners`) and has every learner train
   on its share; their gradients are averaged before each optimizer step (`trainer.engine.ray.distributed`).
   AlignProp (`learn_by_reward`) splits the epoch's shards instead: each learner samples its own
   with gradients, scores them with its own differentiable reward and trains on them, its gradients
   averaged the same way;
4. publishes rank 0's trainable weights (to the rollout workers and the checkpoint).
"""

from __future__ import annotations

import time

import ray
import torch
from ray.util.placement_group import remove_placement_group

from sampler.rollout import Rollout
from trainer.config import Config
from trainer.engine.ray.placement import bundle, in_bundle, place_gang
from trainer.engine.ray.workers import LearnerActor
from trainer.errors import UserError
from trainer.rewards.scores import Scores

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def split_for_learners(rollout: Rollout, n: int) -> list[Rollout]:
    """Split a gathered batch into `n` equal, contiguous shares of whole groups.

    A group (the nb_gen edits of one input) stays on one learner, so the ranking objective sees all
    of its edits; advantages and ranks are per-item fields of the batch and travel with their edits.
    Raises RuntimeError when the groups cannot be split into equal shares (after failed groups were
    dropped): unequal shares would run different numbers of steps and stall the gradient all-reduce.

    Args:
        rollout: N items; `rollout.group` (N,) contiguous runs.
    """
    if n == 1:
        return [rollout]
    group = rollout.group.cpu()
    runs = torch.unique_consecutive(group)
    if len(runs) != len(torch.unique(group)):
        raise RuntimeError("the batch's groups are not contiguous; cannot split it between learners")
    change = (torch.nonzero(group[1:] != group[:-1]).view(-1) + 1).tolist()
    starts, ends = [0, *change], [*change, len(group)]
    if len(starts) % n:
        raise RuntimeError(
            f"{len(starts)} groups cannot be split evenly over {n} learners (were some dropped after "
            "failed scoring?); not training on unequal shares"
        )
    per = len(starts) // n
    bounds = [(starts[k * per], ends[(k + 1) * per - 1]) for k in range(n)]
    if len({hi - lo for lo, hi in bounds}) != 1:
        raise RuntimeError(f"learner shares would differ in size ({[hi - lo for lo, hi in bounds]} edits)")
    return [rollout.select(torch.arange(lo, hi)) for lo, hi in bounds]


def merge_metrics(results: list[dict[str, float]]) -> dict[str, float]:
    """One epoch's metrics over the learners: means (equal shares), `nonfinite_skipped` the largest."""
    out = {}
    for key in results[0]:
        values = [r[key] for r in results]
        out[key] = max(values) if key == "nonfinite_skipped" else sum(values) / len(values)
    return out


class LearnerGroup:
    """`config.data_parallel_size` learner actors; rank 0's weights are the run's.

    Args:
        config: the run configuration (`config.ray` sizes and places the learners).
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        r = config.ray
        n = config.data_parallel_size
        one = bundle(r.num_cpus_per_learner, r.num_gpus_per_learner)
        self.pg = place_gang("learner(s)", n, one, r.learner_placement_strategy, r.start_timeout_s)
        self.actors: list = []
        try:
            # One torch thread per reserved CPU: several learners on a small machine would
            # otherwise each start as many threads as it has cores.
            env = {"OMP_NUM_THREADS": str(max(1, int(r.num_cpus_per_learner)))}
            actor = ray.remote(LearnerActor)
            self.actors = [
                actor.options(
                    num_cpus=r.num_cpus_per_learner,
                    num_gpus=r.num_gpus_per_learner,
                    max_restarts=0,  # a lost learner stops the run: its optimizer state is gone
                    runtime_env={"env_vars": env},
                    scheduling_strategy=in_bundle(self.pg, i),
                ).remote(config, i, n)
                for i in range(n)
            ]
            self.placement = ray.get([a.ready.remote() for a in self.actors], timeout=r.start_timeout_s)
            if n > 1:
                self._form_group()
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.actors)

    def _form_group(self) -> None:
        r = self.config.ray
        nodes = {p["node_id"] for p in self.placement}
        if r.learner_host in LOOPBACK and len(nodes) > 1:
            raise UserError(
                f"ray.learner_host={r.learner_host} but the {len(self.actors)} learners were placed on "
                f"{len(nodes)} nodes: set ray.learner_host=auto (or learner 0's node address), or "
                "ray.learner_placement_strategy=STRICT_PACK"
            )
        host, port = ray.get(self.actors[0].listen.remote(r.learner_host), timeout=r.start_timeout_s)
        joins = [a.join.remote(host, port, r.train_timeout_s) for a in self.actors]
        self._wait(joins, r.start_timeout_s, "join the process group")
        self.rendezvous = (host, port)

    def _wait(self, refs: list, timeout_s: float, what: str) -> list:
        """Results of `refs` in order; raises as soon as one learner fails (the others would wait in
        a collective for it), or RuntimeError after `timeout_s`."""
        results: dict = {}
        pending = {ref: i for i, ref in enumerate(refs)}
        deadline = time.monotonic() + timeout_s
        while pending:
            remaining = max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=remaining)
            if not ready:
                raise RuntimeError(
                    f"learner(s) {sorted(pending.values())} did not {what} within {timeout_s:.0f}s"
                )
            results[pending.pop(ready[0])] = ray.get(ready[0])
        return [results[i] for i in range(len(refs))]

    def train(self, rollout: Rollout, generator_state: torch.Tensor) -> tuple[dict[str, float], int]:
        """Every learner trains on its share; returns (merged metrics, rank 0's new policy version)."""
        shares = split_for_learners(rollout, len(self.actors))
        refs = [a.train.remote(sh, generator_state) for a, sh in zip(self.actors, shares, strict=True)]
        results = self._wait(refs, self.config.ray.train_timeout_s, "finish the epoch's updates")
        return merge_metrics([m for m, _ in results]), results[0][1]

    def learn_by_reward(self, shards: list, reward_spec: dict, ks: list[int]) -> tuple:
        """AlignProp: learner r samples, scores and trains on the r-th contiguous 1/N of the epoch's
        shards (`ray.num_learners` x `sample.num_batches_per_epoch` of them: equal shares, so every
        rank reaches each gradient all-reduce together). Returns (the edits in shard order, their
        `Scores`, the merged numbers, rank 0's new policy version)."""
        n = len(self.actors)
        per = len(shards) // n
        if per * n != len(shards):
            raise RuntimeError(f"{len(shards)} shards cannot be split evenly over {n} learners")
        refs = [
            a.learn_by_reward.remote(
                shards[r * per : (r + 1) * per], reward_spec, ks[r * per : (r + 1) * per]
            )
            for r, a in enumerate(self.actors)
        ]
        results = self._wait(refs, self.config.ray.train_timeout_s, "finish the epoch's AlignProp updates")
        rollouts = [r for r, _, _, _ in results]
        rollout = Rollout.concat(rollouts) if n > 1 else rollouts[0]
        scores = Scores.concat([s for _, s, _, _ in results])
        return rollout, scores, merge_metrics([m for _, _, m, _ in results]), results[0][3]

    def trainable_state(self) -> tuple[dict[str, torch.Tensor], int]:
        """Rank 0's (name -> CPU tensor of every trained weight, policy version)."""
        return ray.get(self.actors[0].trainable_state.remote(), timeout=self.config.ray.start_timeout_s)

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Rank 0's (trainable weights, optimizer state)."""
        lead = self.actors[0]
        (state, _), optimizer = ray.get(
            [lead.trainable_state.remote(), lead.optimizer_state.remote()],
            timeout=self.config.ray.start_timeout_s,
        )
        return state, optimizer

    def restore(self, trainable: dict[str, torch.Tensor], optimizer: dict, version: int) -> None:
        """Every learner loads the checkpoint (so all ranks hold the same weights and optimizer)."""
        refs = [a.restore.remote(trainable, optimizer, version) for a in self.actors]
        self._wait(refs, self.config.ray.start_timeout_s, "restore the checkpoint")

    def close(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        remove_placement_group(self.pg)
