"""Reward replicas as Ray actors (`reward.launch: ray`): one actor per replica, per scorer.

Each actor hosts `reward_servers.replica.ReplicaThread`: the scorer behind its batcher and a
stream consumer on the scorer's Redis stream, the same code `spie serve` runs for its queue. Ray
places it with the scorer's resources (`reward.ray.scorers[i]`: num_cpus, num_gpus, custom
resources such as {reward_slot: 1} that only reward nodes declare) and restarts it when its process
dies (`max_restarts`); a restarted actor registers again and consumes. The jobs a dead replica held
stay pending and the others (or its successor) take them over after `queue.claim_min_idle_ms`.

Removing a replica drains it (`drain`: stop reading, finish the jobs in hand, deregister), then kills
it without restart. A replica Ray cannot place yet stays pending: that demand is what makes Ray's
autoscaler (and KubeRay) add a node with the resources it asks for.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import ray

from trainer.config.reward_scaling import ScorerReplicas
from trainer.errors import UserError


class RewardReplica:
    """The actor class (wrapped with `ray.remote` by `ReplicaGroup`)."""

    def __init__(self, scorer: str, sections: dict, device: str, redis_url: str, password: str | None):
        from reward_servers.replica import ReplicaThread

        self.replica = ReplicaThread(scorer, sections, device, redis_url=redis_url, password=password)

    def wait_ready(self, timeout_s: float) -> dict:
        """Block until it consumes; where it runs (consumer name, node id, pid)."""
        name = self.replica.wait_ready(timeout_s)
        return {"name": name, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    def drain(self, grace_s: float) -> dict:
        return self.replica.drain(grace_s)

    def info(self) -> dict:
        return self.replica.info()


_ACTOR = ray.remote(RewardReplica)


@dataclass
class Member:
    handle: object
    started: float  # monotonic time it was asked for
    ready_ref: object = None  # wait_ready's ObjectRef until it answered
    drain_ref: object = None  # drain's ObjectRef once it is being removed
    drain_deadline: float = 0.0
    where: dict = field(default_factory=dict)
    ping_ref: object = None  # info's ObjectRef: a health check of a serving member
    next_ping: float = 0.0


class ReplicaGroup:
    """The replica actors of one scorer: `add`, `remove` (draining), `poll` (finish removals)."""

    def __init__(
        self, spec: ScorerReplicas, sections: dict, redis_url: str, password: str | None, namespace=""
    ):
        self.spec, self.sections, self.url, self.password = spec, sections, redis_url, password
        self.namespace = namespace
        self.members: list[Member] = []  # serving or starting
        self.draining: list[Member] = []
        self.failures: list[str] = []

    @property
    def scorer(self) -> str:
        return self.spec.scorer

    def add(self, n: int = 1) -> None:
        s = self.spec
        options = dict(
            num_cpus=s.num_cpus,
            num_gpus=s.num_gpus,
            resources=dict(s.resources),
            max_restarts=s.max_restarts,
            max_concurrency=4,  # info / drain answer while wait_ready blocks
        )
        if self.namespace:
            options["namespace"] = self.namespace
        for _ in range(n):
            handle = _ACTOR.options(**options).remote(
                s.scorer, self.sections, s.device, self.url, self.password
            )
            self.members.append(Member(handle, time.monotonic()))

    def wait_ready(self, timeout_s: float) -> list[dict]:
        """Block until every member consumes; `UserError` naming the scorer when one cannot start."""
        refs = []
        for m in self.members:
            if m.ready_ref is None and not m.where:
                m.ready_ref = m.handle.wait_ready.remote(timeout_s)
            refs.append(m.ready_ref)
        refs = [r for r in refs if r is not None]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s + 5)
        if len(done) < len(refs):
            raise UserError(
                f"reward replicas of {self.scorer}: {len(refs) - len(done)} not placed or not consuming "
                f"within {timeout_s:.0f}s (resources {self._resources()}: does the cluster have them?)"
            )
        for m in self.members:
            if m.ready_ref is not None:
                try:
                    m.where = ray.get(m.ready_ref)
                except ray.exceptions.RayError as err:
                    raise UserError(f"reward replica of {self.scorer} failed: {_first_line(err)}") from None
                m.ready_ref = None
        return [m.where for m in self.members]

    def _resources(self) -> dict:
        s = self.spec
        return {"CPU": s.num_cpus, "GPU": s.num_gpus, **s.resources}

    def remove(self, n: int = 1) -> None:
        """Drain the `n` newest members; `poll` kills them once they finished. One not consuming yet
        (still pending placement, or loading) is killed at once: it holds no job."""
        for _ in range(min(n, len(self.members))):
            m = self.members.pop()
            if not m.where and not (m.ready_ref is not None and ray.wait([m.ready_ref], timeout=0)[0]):
                with contextlib.suppress(Exception):
                    ray.kill(m.handle, no_restart=True)
                continue
            m.drain_ref = m.handle.drain.remote(self.spec.drain_grace_s)
            m.drain_deadline = time.monotonic() + self.spec.drain_grace_s + 30
            self.draining.append(m)

    def poll(self) -> list[dict]:
        """Kill drained members (or those past their drain deadline); check starting ones. Returns
        events: {"action": "ready" | "drained" | "start_failed" | "died" | "restarted", ...}."""
        events, keep = [], []
        for m in self.draining:
            ready, _ = ray.wait([m.drain_ref], timeout=0)
            if ready or time.monotonic() > m.drain_deadline:
                info = {}
                with contextlib.suppress(ray.exceptions.RayError):
                    info = ray.get(m.drain_ref, timeout=0) if ready else {}
                with contextlib.suppress(Exception):
                    ray.kill(m.handle, no_restart=True)
                events.append(
                    {
                        "action": "drained",
                        "completed": info.get("completed"),
                        "scored_again": info.get("scored_again"),
                        "clean": bool(ready),
                    }
                )
            else:
                keep.append(m)
        self.draining = keep
        for m in list(self.members):
            if m.ready_ref is None and not m.where:
                m.ready_ref = m.handle.wait_ready.remote(600.0)
            if m.ready_ref is not None and ray.wait([m.ready_ref], timeout=0)[0]:
                try:
                    m.where = ray.get(m.ready_ref)
                    events.append({"action": "ready", "start_s": round(time.monotonic() - m.started, 2)})
                except ray.exceptions.RayError as err:
                    self.members.remove(m)
                    with contextlib.suppress(Exception):
                        ray.kill(m.handle, no_restart=True)
                    self.failures.append(_first_line(err))
                    events.append({"action": "start_failed", "error": _first_line(err)})
                m.ready_ref = None
            elif m.where:
                events += self._ping(m)
        return events

    def _ping(self, m: Member) -> list[dict]:
        """Every PING_S: is a serving member still there? One Ray gave up on (out of restarts)
        leaves the group, and the autoscaler brings the group back to its minimum."""
        now = time.monotonic()
        if m.ping_ref is None:
            if now >= m.next_ping:
                m.ping_ref, m.next_ping = m.handle.info.remote(), now + PING_S
            return []
        if not ray.wait([m.ping_ref], timeout=0)[0]:
            return []
        ref, m.ping_ref = m.ping_ref, None
        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as err:
            if _actor_state(m.handle) != "DEAD":
                return []  # restarting: it comes back and registers again
            self.members.remove(m)
            return [{"action": "died", "error": _first_line(err)}]
        if info.get("name") and info["name"] != m.where.get("name"):  # Ray restarted it
            m.where = {**m.where, "name": info["name"], "pid": info.get("pid")}
            return [{"action": "restarted"}]
        return []

    @property
    def count(self) -> int:
        """Replica actors held (serving or starting), draining ones not included."""
        return len(self.members)

    def close(self, grace_s: float = 10.0) -> None:
        """Drain everything within `grace_s`, then kill."""
        self.remove(len(self.members))
        deadline = time.monotonic() + grace_s
        refs = [m.drain_ref for m in self.draining]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.monotonic()))
        for m in self.draining:
            with contextlib.suppress(Exception):
                ray.kill(m.handle, no_restart=True)
        self.draining = []


PING_S = 5.0


def _actor_state(handle) -> str:
    """ "ALIVE", "RESTARTING", "DEAD"... from the GCS ("" when it cannot tell)."""
    try:
        from ray._private import state

        return str(state.actors(actor_id=handle._actor_id.hex()).get("State", ""))
    except Exception:
        return ""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    for line in reversed(text.splitlines()):
        if "Error" in line and line.strip():
            return line.strip()[:300]
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def connect_ray(address: str) -> bool:
    """Join `address` (or RAY_ADDRESS), or start a local Ray on loopback; True if this call started it.
    (A Ray engine started later finds it running and uses it.)"""
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or ""
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    # As trainer.engine.ray.engine._single_node: a local Ray whose processes listen on loopback only.
    from ray._private import ray_constants

    env, previous = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[env], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        ray.init(include_dashboard=False, log_to_driver=True, _node_ip_address="127.0.0.1")
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = flag
        os.environ.pop(env) if previous is None else os.environ.__setitem__(env, previous)
    return True


class RayReplicaSet:
    """Every scorer's `ReplicaGroup`, started at `min_replicas` and driven by an `Autoscaler`."""

    def __init__(self, reward, redis_url: str, password: str | None) -> None:
        from reward_servers.queue import protocol as P
        from trainer.rewards.autoscaler import Autoscaler

        r = reward.ray
        self.groups: list[ReplicaGroup] = []
        self.autoscaler = None
        try:
            for sc in reward.scorers:
                spec = r.for_scorer(sc.name, reward.replicas)
                queue = dict(r.queue)
                if reward.queue.blob_dir:  # the blob path: replicas read the folder the trainer writes
                    queue.setdefault("blob_dir", reward.queue.blob_dir)
                sections = {"scorer": dict(sc.kwargs), "queue": queue, "batching": dict(r.batching)}
                group = ReplicaGroup(spec, sections, redis_url, password, r.namespace)
                group.add(spec.min_replicas)
                self.groups.append(group)
            for group in self.groups:
                where = group.wait_ready(reward.server_start_timeout_s)
                nodes = len({w["node_id"] for w in where})
                print(f"[spie] {len(where)} {group.scorer} replica actor(s) consuming on {nodes} node(s)")
            client = P.connect(redis_url, password, socket_timeout=10.0)
            self.autoscaler = Autoscaler(self.groups, client, r.interval_s).start()
        except BaseException:
            self.close()
            raise

    def metrics(self) -> dict:
        return self.autoscaler.metrics() if self.autoscaler is not None else {}

    def close(self) -> None:
        if self.autoscaler is not None:
            self.autoscaler.close()
            self.autoscaler.redis.close()
        for group in self.groups:
            group.close(grace_s=group.spec.drain_grace_s)
