"""The `ray` section: rollout workers and learners as Ray actors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class RayConfig:
    # Sample and learn in Ray actors (rollout workers and a learner) driven by this process (a
    # local Ray is started unless `address` or RAY_ADDRESS names one); false: everything runs in
    # this process (`spie train --no-ray`).
    enabled: bool = True
    # Cluster to join: "auto", "<head-ip>:6379" or "ray://<head-ip>:10001". Empty: RAY_ADDRESS if
    # set (e.g. inside `ray job submit`), else a local Ray is started for the run (no dashboard).
    address: str = ""
    # Rollout worker actors. The epoch's sample.num_batches_per_epoch sampling batches are split
    # over them, so there must be at least as many batches as workers.
    num_rollout_workers: int = 1
    # GPUs per rollout worker (0 on CPU).
    num_gpus_per_worker: float = 0.0
    # CPUs reserved per rollout worker.
    num_cpus_per_worker: float = 1.0
    # Extra custom resources per rollout worker, e.g. {"rollout_slot": 1} to pin workers to the
    # nodes that advertise that resource.
    worker_resources: dict[str, float] = field(default_factory=dict)
    # Placement-group strategy for the rollout workers, which are placed as one gang:
    # "PACK", "SPREAD", "STRICT_PACK" or "STRICT_SPREAD" (one worker per node).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # GPUs for the learner actor (0 on CPU).
    num_gpus_per_learner: float = 0.0
    # CPUs reserved for the learner actor.
    num_cpus_per_learner: float = 1.0
    # Torch threads in each rollout-worker and learner actor (0: Ray's default, one per reserved
    # CPU). The synchronous loop runs sampling and learning in turn, so on a small machine both may
    # use every core (the demo sets 2 on 2 cores).
    torch_threads: int = 0
    # Data-parallel learners: the one knob for the number of training processes (more than 1 needs
    # ray.enabled). The learner actors form one torch.distributed process
    # group (gloo on CPU, NCCL on GPU); each trains on its 1/num_learners share of the gathered batch
    # (whole groups; advantages and rankings are computed over the whole batch first), and their
    # gradients are averaged by an all-reduce before every optimizer step. Each learner is one of the
    # data-parallel processes the per-process sizes count (sample.batch_size, num_batches_per_epoch,
    # train.batch_size), so the driver samples num_learners x sample.num_batches_per_epoch batches.
    num_learners: int = 1
    # Address of the learners' rendezvous, a TCP store on learner 0 that listens on it alone (gloo
    # and NCCL use the same interface): "127.0.0.1" for learners on one node; "auto" for learner 0's
    # node address as Ray knows it, or that address itself, when they span nodes (then keep the port
    # range closed to all but the cluster's network: the store accepts anyone who reaches it).
    learner_host: str = "127.0.0.1"
    # Placement-group strategy for the learners, placed as one gang ("PACK" keeps them on one node
    # when they fit, which the loopback rendezvous needs).
    learner_placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Times Ray restarts a rollout worker that died (-1: without limit); its share of the epoch
    # is then sampled again.
    max_restarts: int = 3
    # Seconds for the actors to be placed and to load the model.
    start_timeout_s: float = 600.0
    # Seconds one epoch's rollouts may take before the run stops with an error.
    rollout_timeout_s: float = 1800.0
    # Seconds one learner update (an epoch of training) may take.
    train_timeout_s: float = 3600.0
