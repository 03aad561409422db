"""Replica presence: each replica of a scorer is visible from its start until it is gone.

A replica registers at start (XGROUP CREATECONSUMER, so the group counts it before its first job,
and a field in the scorer's `spie:q:S:replicas` hash), refreshes its entry every heartbeat and
removes both on a clean exit (drain). A crashed replica's entry is ignored once `seen_ms + ttl_ms`
passed on Redis's clock, and pruned by whoever reads it (`live_replicas`).

An entry also carries what the replica measured: `completed` (jobs it finished) and `busy_s`
(seconds it held at least one job), from which an autoscaler reads a replica's service rate, and
`draining` (it stopped taking jobs and finishes the ones in hand).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time

import redis

from reward_servers.queue import protocol as P

log = logging.getLogger("spie.queue")
DEREGISTER_S = 3.0  # most seconds a clean exit spends deregistering
MIN_TTL_MS = 5_000  # a replica missing this long (and 3 presence refreshes) counts as gone
PRESENCE_MS = 1_000  # presence is refreshed this often (or every heartbeat_ms, if shorter)


def presence_interval_ms(heartbeat_ms: int) -> int:
    return min(PRESENCE_MS, heartbeat_ms)


def presence_ttl_ms(heartbeat_ms: int) -> int:
    """How long an entry stays live without a refresh: a few seconds, whatever the claim heartbeat."""
    return max(MIN_TTL_MS, 3 * presence_interval_ms(heartbeat_ms))


def redis_now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def live_replicas(client: redis.Redis, scorer: str, prune: bool = True) -> dict[str, dict]:
    """{replica name: presence entry} of the scorer's live replicas; stale entries are removed."""
    raw = client.hgetall(P.replicas_key(scorer))
    now = redis_now_ms(client)
    live, stale = {}, []
    for name, value in raw.items():
        name = name.decode() if isinstance(name, bytes) else name
        try:
            entry = json.loads(value)
            fresh = now < int(entry["seen_ms"]) + int(entry["ttl_ms"])
        except (ValueError, KeyError, TypeError):
            entry, fresh = None, False
        if fresh:
            live[name] = entry
        else:
            stale.append(name)
    if stale and prune:
        client.hdel(P.replicas_key(scorer), *stale)
    return live


class ReplicaPresence:
    """Mixin of `StreamConsumer`: registration, presence refresh, busy time and dead-consumer cleanup.

    Expects `redis` (asyncio client), `stream`, `scorer_name`, `name`, `config` (heartbeat_ms,
    forget_idle_ms), `completed`, `_held` and `_redis_now_ms()` on the consumer."""

    def _presence_init(self) -> None:
        self._started_ms = 0
        self.scored_again = 0  # jobs scored here whose result another replica had written already
        self._busy_s = 0.0
        self._busy_since: float | None = None
        self._draining = False
        self._host = socket.gethostname()

    def _busy_update(self) -> None:
        """Call after `_held` changed: accumulates the time at least one job was held."""
        now = time.monotonic()
        if self._held and self._busy_since is None:
            self._busy_since = now
        elif not self._held and self._busy_since is not None:
            self._busy_s += now - self._busy_since
            self._busy_since = None

    def busy_seconds(self) -> float:
        extra = time.monotonic() - self._busy_since if self._busy_since is not None else 0.0
        return self._busy_s + extra

    def _presence_entry(self) -> str:
        return json.dumps(
            {
                "seen_ms": int(self._redis_now_ms()),
                "ttl_ms": presence_ttl_ms(self.config.heartbeat_ms),
                "started_ms": self._started_ms,
                "host": self._host,
                "pid": os.getpid(),
                "completed": self.completed,
                "scored_again": self.scored_again,
                "busy_s": round(self.busy_seconds(), 3),
                "held": len(self._held),
                "draining": self._draining,
            }
        )

    async def _register(self) -> None:
        """Join the group as a consumer now (not at the first read) and publish presence."""
        if not self._started_ms:
            self._started_ms = int(self._redis_now_ms())
        try:
            await self.redis.xgroup_createconsumer(self.stream, P.GROUP, self.name)
        except redis.ResponseError as err:  # Redis < 6.2: the group learns of it at its first read
            if "unknown" not in str(err).lower():
                raise
        await self._refresh_presence()

    async def _refresh_presence(self) -> None:
        await self.redis.hset(P.replicas_key(self.scorer_name), self.name, self._presence_entry())

    async def _deregister(self) -> None:
        """On a clean exit: drop the presence entry, and the group consumer if it holds nothing
        (within DEREGISTER_S: a frozen Redis must not hold up the exit; the entry then lapses)."""

        async def deregister() -> None:
            await self.redis.hdel(P.replicas_key(self.scorer_name), self.name)
            pending = await self.redis.xpending_range(
                self.stream, P.GROUP, "-", "+", 1, consumername=self.name
            )
            if not pending:
                await self.redis.xgroup_delconsumer(self.stream, P.GROUP, self.name)

        try:
            await asyncio.wait_for(deregister(), DEREGISTER_S)
        except (redis.RedisError, OSError, asyncio.TimeoutError) as err:
            log.warning("queue %s: could not deregister %s: %r", self.stream, self.name, err)

    async def _forget_dead_consumers(self) -> list[str]:
        """Remove consumers idle longer than `forget_idle_ms` that hold no pending job (their jobs
        were taken over), so the group's consumer count means live replicas."""
        removed = []
        try:
            consumers = await self.redis.xinfo_consumers(self.stream, P.GROUP)
        except redis.ResponseError:  # stream or group gone (Redis restarted): the read recreates it
            return removed
        for consumer in consumers:
            name = consumer["name"].decode() if isinstance(consumer["name"], bytes) else str(consumer["name"])
            if name == self.name or consumer["pending"] or consumer["idle"] < self.config.forget_idle_ms:
                continue
            # DELCONSUMER drops the consumer's pending entries: only ever with none pending.
            if await self.redis.xgroup_delconsumer(self.stream, P.GROUP, name) == 0:
                removed.append(name)
            else:  # it took a job meanwhile: it is alive after all
                log.warning("queue %s: consumer %s held jobs when removed", self.stream, name)
        if removed:
            log.info("queue %s: removed %d dead consumer(s): %s", self.stream, len(removed), removed)
        return removed
