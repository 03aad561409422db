"""Helpers for the Ray reward-replica tests (a uniquely named module): a `reward` config section for
the `sleep` scorer on Ray actors, and the checks that nothing was lost, doubled or dead-lettered."""

from __future__ import annotations

import threading
import time

import numpy as np

from reward_servers.queue import protocol as P
from reward_servers.queue.presence import live_replicas
from trainer.config.reward_scaling import RayRewardConfig, ScorerReplicas
from trainer.config.schema import RewardConfig, ScorerConfig

# A dead replica's jobs go to the others after 1 s (heartbeats every 250 ms keep live ones in place).
FAST_CLAIMS = {"claim_min_idle_ms": 1000, "heartbeat_ms": 250, "claim_interval_ms": 250, "block_ms": 200}


def sleep_reward(
    batch_seconds: float, max_batch_size: int, interval_s: float = 0.25, **replicas
) -> RewardConfig:
    """`reward` with one `sleep` scorer on Ray actors; `replicas` are ScorerReplicas fields."""
    spec = ScorerReplicas(scorer="sleep", **{"num_cpus": 0.25, "drain_grace_s": 20.0, **replicas})
    return RewardConfig(
        scorers=(
            ScorerConfig(
                name="sleep", kwargs={"batch_seconds": batch_seconds, "max_batch_size": max_batch_size}
            ),
        ),
        transport="queue",
        launch="ray",
        server_start_timeout_s=60.0,
        ray=RayRewardConfig(scorers=(spec,), interval_s=interval_s, queue=dict(FAST_CLAIMS)),
    )


class Watch:
    """Samples the presence hash every 0.1 s: the most `scored_again` each replica reported and the
    replica names seen (so replicas that left still count)."""

    def __init__(self, rdb, scorer: str = "sleep") -> None:
        self.rdb, self.scorer = rdb, scorer
        self.scored_again: dict[str, int] = {}
        self.counts: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            live = live_replicas(self.rdb, self.scorer, prune=False)
            self.counts.append(len(live))
            for name, entry in live.items():
                self.scored_again[name] = max(
                    self.scored_again.get(name, 0), int(entry.get("scored_again", 0))
                )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def check_nothing_lost(scores, expected, client_counts: dict, rdb, jobs: int, scorer: str = "sleep") -> None:
    """Every item scored with its own score, written once: no resubmission, no dead letter, one first
    write per job. (The client's `queue.duplicates_ignored` counts signals of results its sweep had
    already fetched, not double scoring: replicas count that as `scored_again`, see `scored_again`.)"""
    np.testing.assert_allclose(scores.values[scorer], expected, atol=1e-9)
    assert all(e is None for e in scores.errors[scorer])
    assert client_counts.get("queue.resubmitted", 0) == 0
    assert rdb.xlen(P.dead_key(scorer)) == 0
    assert int(rdb.get(P.done_key(scorer)) or 0) == jobs  # one first write per job
    assert rdb.xlen(P.jobs_key(scorer)) == 0


def wait_until(predicate, timeout_s: float, what: str, step_s: float = 0.1, describe=None):
    """Poll `predicate` until it is truthy; on timeout, fail naming `what` (and `describe()`)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    detail = f" ({describe()})" if describe else ""
    raise AssertionError(f"not within {timeout_s:.0f}s: {what}{detail}")


def scored_again(group) -> int:
    """Jobs the group's live replicas scored after another replica had written their result."""
    import ray

    return sum(
        ray.get([m.handle.info.remote() for m in group.members], timeout=30)[i]["scored_again"]
        for i in range(len(group.members))
    )
