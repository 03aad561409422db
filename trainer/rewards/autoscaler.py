"""Each scorer scales its own Ray replicas (`reward.ray.scorers[i]`: min/max_replicas, target_drain_s,
scale_up/down_cooldown_s), from a thread in the driver.

Every `reward.ray.interval_s` it reads, per scorer, the backlog (the stream's length: jobs waiting or
being scored; acknowledged jobs are deleted) and the replicas' measured service rate (jobs finished
per second a replica held work, from their presence entries, `reward_servers.queue.presence`), and
wants `ceil(backlog / (rate x target_drain_s))` replicas within [min, max]. Before any rate is
measured it adds one replica at a time while there is a backlog. It adds replicas at once (then waits
`scale_up_cooldown_s`); it removes them only after the want stayed lower for `scale_down_cooldown_s`,
and removing drains (a replica stops taking jobs, finishes and acknowledges the ones it holds, then
exits), so nothing is lost, scored twice or dead-lettered.

Every scaling event and each scorer's replica count go to the run's metrics (`metrics()`, merged into
each epoch's line of metrics.jsonl by the loop): `reward/<scorer>/replicas`, `.../replicas_max`,
`.../draining` (removed, still finishing their jobs), `.../replica_seconds`, and `reward/scaling_events` (a list).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass

from trainer.config.reward_scaling import ScorerReplicas

log = logging.getLogger("spie.autoscale")
RATE_SMOOTHING = 0.5  # weight of a new rate sample in the running estimate
MIN_BUSY_S = 0.2  # a rate sample needs at least this much busy replica time


def wanted(spec: ScorerReplicas, backlog: int, rate: float | None, current: int) -> int:
    """Replicas that drain `backlog` jobs within `target_drain_s` at `rate` jobs/s each, within bounds."""
    if backlog <= 0:
        need = 0
    elif rate is None or rate <= 0:
        need = current + 1  # nothing measured yet: one more while there is work
    else:
        need = math.ceil(backlog / (rate * spec.target_drain_s))
    return max(spec.min_replicas, min(spec.most, need))


@dataclass
class ScorerState:
    """The autoscaler's memory of one scorer."""

    last_event: float = -math.inf  # monotonic time of the last scaling event
    low_since: float | None = None  # since when fewer replicas were wanted
    rate: float | None = None  # jobs per busy replica-second (smoothed)
    seen: dict | None = None  # replica name -> (completed, busy_s) at the last look

    def measure(self, live: dict[str, dict]) -> None:
        """Fold the replicas' progress since the last sample into `rate`.

        A replica finishes jobs in steps (a whole batch at once) while its busy time grows smoothly,
        so a look that saw no job finish is not a sample of its own: its busy time is carried into
        the next look that does. (Dropping those looks would count only the ones that saw a batch
        finish, and overstate the rate by the batch time over the look interval: 3x for 0.8 s
        batches looked at every 0.25 s.)"""
        now = {n: (int(e.get("completed", 0)), float(e.get("busy_s", 0.0))) for n, e in live.items()}
        if self.seen is None:
            self.seen = now
            return
        done = busy = 0.0
        for name, (completed, busy_s) in now.items():
            if name in self.seen:
                done += completed - self.seen[name][0]
                busy += busy_s - self.seen[name][1]
        if busy >= MIN_BUSY_S and done > 0:
            sample = done / busy
            self.rate = (
                sample if self.rate is None else (1 - RATE_SMOOTHING) * self.rate + RATE_SMOOTHING * sample
            )
            self.seen = now
        else:  # no sample yet: keep the baseline of those still here, start one for newcomers
            self.seen = {name: self.seen.get(name, figures) for name, figures in now.items()}

    def decide(self, spec: ScorerReplicas, backlog: int, current: int, now: float) -> int:
        """The replica count to move to now (== current: no change)."""
        target = wanted(spec, backlog, self.rate, current)
        if target > current:
            self.low_since = None
            return target if now - self.last_event >= spec.scale_up_cooldown_s else current
        if target < current:
            self.low_since = now if self.low_since is None else self.low_since
            calm = min(now - self.low_since, now - self.last_event)
            return target if calm >= spec.scale_down_cooldown_s else current
        self.low_since = None
        return current


class Autoscaler:
    """Drives `ReplicaGroup`s from Redis figures on a daemon thread; `metrics()` per epoch."""

    def __init__(self, groups: list, redis_client, interval_s: float) -> None:
        self.groups = {g.scorer: g for g in groups}
        self.redis = redis_client
        self.interval_s = interval_s
        self.states = {name: ScorerState() for name in self.groups}
        self.events: list[dict] = []
        self.t0 = time.monotonic()
        self._lock = threading.RLock()  # a tick and metrics() see each other whole
        self._stop = threading.Event()
        self._peak = {name: g.count for name, g in self.groups.items()}
        self._replica_s = dict.fromkeys(self.groups, 0.0)  # since the last metrics()
        self.replica_s_total = dict.fromkeys(self.groups, 0.0)  # since the start
        self._last_tick = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="reward-autoscaler", daemon=True)

    def start(self) -> Autoscaler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception as err:  # a Redis hiccup: try again next interval
                log.warning("reward autoscaler: %s: %s", type(err).__name__, err)

    def tick(self) -> None:
        """One look at every scorer: finish removals, measure, scale. Holds the lock throughout, so
        metrics() never sees a group that let a replica go without the event that says so."""
        with self._lock:
            self._tick()

    def _tick(self) -> None:
        from reward_servers.queue import protocol as P
        from reward_servers.queue.presence import live_replicas

        now = time.monotonic()
        for name, group in self.groups.items():
            held = (group.count + len(group.draining)) * (now - self._last_tick)
            self._replica_s[name] += held
            self.replica_s_total[name] += held
        self._last_tick = now
        for name, group in self.groups.items():
            for event in group.poll():
                self._event(name, **event)
            state, spec = self.states[name], group.spec
            backlog = int(self.redis.xlen(P.jobs_key(name)))
            state.measure(live_replicas(self.redis, name))
            current = group.count
            target = state.decide(spec, backlog, current, now)
            if target == current:
                continue
            if target > current:
                group.add(target - current)
            else:
                group.remove(current - target)
            state.last_event, state.low_since = now, None
            rate = None if state.rate is None else round(state.rate, 2)
            self._event(
                name, action="up" if target > current else "down", to=target, backlog=backlog, rate=rate
            )
            self._peak[name] = max(self._peak[name], target)

    def _event(self, scorer: str, **fields) -> None:
        """Keep an event for metrics() and publish it for `spie queue stats`."""
        from reward_servers.queue import protocol as P

        event = {"t": round(time.monotonic() - self.t0, 2), "scorer": scorer, **fields}
        log.info("reward autoscaler: %s", event)
        with self._lock:
            self.events.append(event)
        self.redis.xadd(
            P.scaling_key(scorer),
            {"event": json.dumps(fields)},
            maxlen=P.SCALING_MAXLEN,
            approximate=True,
        )

    def metrics(self) -> dict:
        """Replica counts since the last call, and the scaling events (then forgotten)."""
        out: dict = {}
        with self._lock:
            for name, group in self.groups.items():
                out[f"reward/{name}/replicas"] = group.count
                out[f"reward/{name}/replicas_max"] = self._peak[name]
                out[f"reward/{name}/draining"] = len(group.draining)
                out[f"reward/{name}/replica_seconds"] = round(self._replica_s[name], 2)
                self._peak[name] = group.count
                self._replica_s[name] = 0.0
            events, self.events = self.events, []
        out["reward/scaling_events"] = events
        return out

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 30)
