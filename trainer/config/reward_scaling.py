"""`reward.ray`: reward replicas as Ray actors (`reward.launch: ray`), placed and scaled per scorer.

    reward:
      transport: queue
      launch: ray                  # local | ray | none (launch_servers: false means none)
      redis_host: 10.0.0.5         # the head's address, so replicas on other nodes reach the run's Redis
      ray:
        queue: {claim_min_idle_ms: 10000}
        scorers:
          - {scorer: vlm_judge, num_gpus: 1, device: "cuda:0", resources: {reward_slot: 1},
             min_replicas: 1, max_replicas: 4, target_drain_s: 10}

A scorer without an entry in `reward.ray.scorers` gets `ScorerReplicas()` with `reward.replicas` as
both its minimum and maximum (a fixed count on 1 CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainer.errors import UserError


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


@dataclass(frozen=True)
class ScorerReplicas:
    """One scorer's replica actors: resources, restarts and autoscaling (`reward.ray.scorers[i]`)."""

    # Registered scorer name (one of reward.scorers).
    scorer: str = ""
    # CPUs Ray reserves for each replica actor.
    num_cpus: float = 1.0
    # GPUs Ray reserves for each replica actor (Ray sets CUDA_VISIBLE_DEVICES; pair with device).
    num_gpus: float = 0.0
    # Custom Ray resources per replica, e.g. {reward_slot: 1} to pin replicas to reward nodes.
    resources: dict[str, float] = field(default_factory=dict)
    # Device the scorer runs on inside its actor ("cpu", "cuda:0": the actor's first visible GPU).
    device: str = "cpu"
    # Times Ray restarts a replica whose process died (-1: always); its jobs go to the others.
    max_restarts: int = -1
    # Fewest replicas kept running (the autoscaler never goes below, and starts with these).
    min_replicas: int = 1
    # Most replicas; 0: min_replicas (a fixed count, no autoscaling).
    max_replicas: int = 0
    # Target: the scorer's backlog (jobs in its stream) drained within this many seconds at the
    # replicas' measured rate; more replicas are added when it would take longer.
    target_drain_s: float = 10.0
    # Seconds after a scaling event before replicas are added again.
    scale_up_cooldown_s: float = 2.0
    # Seconds the backlog must stay low (and since the last event) before a replica is removed.
    scale_down_cooldown_s: float = 15.0
    # Seconds a removed replica may take to finish the jobs it holds before it is killed (the
    # jobs it still holds then are taken over by the others after queue.claim_min_idle_ms).
    drain_grace_s: float = 60.0

    def __post_init__(self) -> None:
        where = f"reward.ray.scorers[{self.scorer or '?'}]"
        _need(self.num_cpus >= 0, f"{where}.num_cpus must be >= 0, got {self.num_cpus}")
        _need(self.num_gpus >= 0, f"{where}.num_gpus must be >= 0, got {self.num_gpus}")
        bad = {k: v for k, v in self.resources.items() if not isinstance(v, int | float) or v < 0}
        _need(not bad, f"{where}.resources must map names to amounts >= 0, got {bad}")
        _need(self.max_restarts >= -1, f"{where}.max_restarts must be >= -1, got {self.max_restarts}")
        _need(self.min_replicas >= 1, f"{where}.min_replicas must be >= 1, got {self.min_replicas}")
        _need(
            self.max_replicas == 0 or self.max_replicas >= self.min_replicas,
            f"{where}.max_replicas ({self.max_replicas}) must be 0 or >= min_replicas ({self.min_replicas})",
        )
        _need(self.target_drain_s > 0, f"{where}.target_drain_s must be > 0, got {self.target_drain_s}")
        for name in ("scale_up_cooldown_s", "scale_down_cooldown_s", "drain_grace_s"):
            _need(getattr(self, name) >= 0, f"{where}.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def most(self) -> int:
        return self.max_replicas or self.min_replicas


@dataclass(frozen=True)
class RayRewardConfig:
    """`reward.ray`: where and how many replica actors each scorer gets (with `reward.launch: ray`)."""

    # Per-scorer placement and scaling; scorers not listed get ScorerReplicas() with
    # min_replicas = max_replicas = reward.replicas.
    scorers: tuple[ScorerReplicas, ...] = ()
    # Seconds between the autoscaler's looks at each scorer's backlog.
    interval_s: float = 1.0
    # The replicas' stream-consumer settings (a `spie serve` YAML's `queue` section, e.g.
    # claim_min_idle_ms: how soon a dead replica's jobs go to the others).
    queue: dict[str, Any] = field(default_factory=dict)
    # The replicas' batching settings (a `spie serve` YAML's `batching` section).
    batching: dict[str, Any] = field(default_factory=dict)
    # Ray namespace of the replica actors; empty: Ray's default (anonymous) namespace.
    namespace: str = ""

    def __post_init__(self) -> None:
        _need(self.interval_s > 0, f"reward.ray.interval_s must be > 0, got {self.interval_s}")
        names = [s.scorer for s in self.scorers]
        _need(all(names), "reward.ray.scorers: every entry needs `scorer` (a name of reward.scorers)")
        _need(len(set(names)) == len(names), f"reward.ray.scorers lists a scorer twice: {names}")

    def for_scorer(self, name: str, replicas: int) -> ScorerReplicas:
        """The entry of scorer `name`, or the fixed default of `replicas` replicas."""
        for entry in self.scorers:
            if entry.scorer == name:
                return entry
        return ScorerReplicas(scorer=name, min_replicas=replicas, max_replicas=replicas)


def launch_mode(reward: Any) -> str:
    """Where the queue's replicas run: "local", "ray" or "none" (`reward.launch_servers: false`
    is the older spelling of "none")."""
    return "none" if not reward.launch_servers else reward.launch


def check_reward_scaling(reward: Any) -> None:
    """Cross-field checks: every `reward.ray.scorers` entry names a configured scorer."""
    names = {sc.name for sc in reward.scorers}
    unknown = [s.scorer for s in reward.ray.scorers if s.scorer not in names]
    _need(not unknown, f"reward.ray.scorers names {unknown}, not in reward.scorers ({sorted(names)})")
    _need(
        reward.launch != "ray" or reward.transport == "queue",
        f"reward.launch=ray needs reward.transport=queue, got {reward.transport!r}",
    )
