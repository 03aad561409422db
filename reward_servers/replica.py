"""One queue-only scorer replica inside a host process: the public serving API for hosts that
manage processes themselves (a Ray actor, `trainer.rewards.ray_replicas`).

    replica = ReplicaThread("sleep", {"scorer": {"batch_seconds": 0.1}, "queue": {...}},
                            redis_url=url, password=pw)
    replica.wait_ready(120)      # scorer loaded, consumer registered and reading
    replica.drain(60)            # stop taking jobs, finish the ones in hand, deregister

It runs what `spie serve` runs for its queue (the scorer behind a `DynamicBatcher`, a
`StreamConsumer` on the scorer's stream) without a gRPC port, on an event loop of its own thread, so
the host's own thread stays free (a Ray actor answers `drain` and `info` calls meanwhile). A replica
that dies (its process killed) leaves its jobs pending: other replicas take them over after
`queue.claim_min_idle_ms`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import time
from typing import Any

from reward_servers.errors import UserError


class ReplicaThread:
    """A replica of `scorer` consuming its stream from a background thread.

    Args:
        scorer: registered scorer name.
        sections: what a `spie serve --config` YAML holds: `scorer` (constructor kwargs), `queue`,
            `batching`, `server` (only its input limits and drain grace matter here).
        device: device of model-backed scorers.
        redis_url: the Redis to consume (default: queue.url, then REDIS_URL).
        password: Redis password when not in the URL (default: REDIS_PASSWORD).
        name: consumer name (default: host-pid-random).
    """

    def __init__(
        self,
        scorer: str,
        sections: dict[str, Any] | None = None,
        device: str = "cpu",
        redis_url: str = "",
        password: str | None = None,
        name: str | None = None,
    ) -> None:
        from reward_servers.cli import _scorer_factory
        from reward_servers.config import serve_config_from_dict

        cfg = serve_config_from_dict(dict(sections or {}), f"replica {scorer}")
        url = redis_url or cfg.queue.url or os.environ.get("REDIS_URL", "")
        if not url:
            raise UserError(f"replica {scorer}: no Redis URL (redis_url, queue.url or REDIS_URL)")
        self.scorer_name = scorer
        self.config = cfg
        self.queue_config = dataclasses.replace(cfg.queue, url=url)
        self.password = password
        self.consumer_name = name
        self._factory = _scorer_factory(scorer, device, cfg.scorer)
        self._device = device
        self.server = self.consumer = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=f"replica-{scorer}", daemon=True)
        self._thread.start()

    # ---- the replica's own thread -----------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as err:  # reported by wait_ready
            self.error = err
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        from reward_servers.queue.consumer import StreamConsumer
        from reward_servers.server import RewardServer

        cfg = self.config
        self.server = RewardServer(self._factory, self.scorer_name, cfg.server, cfg.batching, self._device)
        await self.server.load()
        self.consumer = StreamConsumer(
            self.server.scorer,
            self.server.batcher,
            self.queue_config,
            password=self.password,
            max_pixels=self.config.server.max_pixels,
            name=self.consumer_name,
            max_decoded_bytes=self.config.server.max_decoded_mb * 1024 * 1024,
            decoded_budget=self.server.decoded_budget,
        )
        await self.consumer.start()

    # ---- the host's calls -------------------------------------------------------------------------

    def wait_ready(self, timeout_s: float) -> str:
        """Block until the replica consumes its stream; its consumer name. `UserError` when its
        scorer failed to load, Redis was unreachable, or `timeout_s` passed."""
        if not self._ready.wait(timeout_s):
            raise UserError(f"replica {self.scorer_name} not consuming within {timeout_s:.0f}s")
        if self.error is not None:
            err = self.error
            raise UserError(f"replica {self.scorer_name} failed to start: {type(err).__name__}: {err}")
        return self.consumer.name

    def drain(self, grace_s: float | None = None) -> dict:
        """Stop taking jobs, finish the ones in hand within `grace_s` (default server.drain_grace_s),
        deregister and stop; returns `info()` as it ended. Safe to call twice."""
        grace = self.config.server.drain_grace_s if grace_s is None else grace_s
        if self._ready.is_set() and self.error is None and self._loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._drain(grace), self._loop)
            future.result(timeout=grace + self.queue_config.block_ms / 1000 + 30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        return self.info()

    async def _drain(self, grace_s: float) -> None:
        t0 = time.monotonic()
        await self.consumer.stop(grace_s=grace_s)
        await self.server.stop(grace_s=max(0.0, grace_s - (time.monotonic() - t0)))

    def info(self) -> dict:
        """name, completed (jobs this replica finished first), scored_again, busy_s, held, pid."""
        c = self.consumer
        if c is None:
            return {"name": self.consumer_name, "completed": 0, "scored_again": 0, "busy_s": 0.0, "held": 0}
        return {
            "name": c.name,
            "completed": c.completed,
            "scored_again": c.scored_again,
            "busy_s": c.busy_seconds(),
            "held": len(c._held),
            "pid": os.getpid(),
        }
