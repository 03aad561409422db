"""How a replica writes what happened to a job: its result (once, with the acknowledgement, in one
Lua script), a requeue after a scorer failure, a dead letter; every write bounded by the job's
deadline plus a short grace, so a frozen Redis cannot hold a slot for long.

`StreamConsumer` (consumer.py) inherits these; they use its `redis`, `scorer_name`, `stream`,
`config`, `name`, `completed` and `_stopping`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from dataclasses import dataclass

import redis

from protos.spie.reward.v1 import reward_pb2 as pb
from reward_servers.queue import protocol as P

log = logging.getLogger("spie.queue")
_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, OSError, asyncio.TimeoutError)
# Seconds a write may take past its job's deadline (an acknowledgement after expiry, a dead letter).
WRITE_GRACE_S = 2.0
_COMPLETE_SHA = hashlib.sha1(P.COMPLETE_MANY_LUA.encode()).hexdigest()  # as Redis names it (EVALSHA)


@dataclass
class _Job:
    entry_id: str
    run: str
    batch: str
    index: int
    deadline_ms: int
    keys: P.BatchKeys
    expires: float  # time.monotonic() after which the client no longer waits for this job
    budget_ms: int | None = None
    gen: int = 0
    attempt: int = 0
    scorer: str = ""

    @property
    def attempts_field(self) -> str:
        return P.attempts_field(self.scorer, self.index, self.gen)


class JobWrites:
    async def _bounded(self, coro, until: float, grace_s: float = 0.0):
        """Await a Redis call for at most the time left before `until` (monotonic) plus `grace_s`
        (at least 0.1 s); a call cut short raises asyncio.TimeoutError, one of _REDIS_DOWN."""
        return await asyncio.wait_for(coro, max(0.1, until - time.monotonic() + grace_s))

    # ---- writing ---------------------------------------------------------------------------------

    async def _until_written(self, write, job: _Job | None) -> None:
        """Run `write()` until Redis takes it or the job's deadline (plus WRITE_GRACE_S) passes (then
        the client resubmits); no single try outlasts that either."""
        until = (job.expires if job is not None else time.monotonic() + 30) + WRITE_GRACE_S
        backoff = 0.05
        while True:
            try:
                await self._bounded(write(), until)
                return
            except _REDIS_DOWN as err:
                if time.monotonic() >= until or self._stopping:
                    log.warning("queue %s: could not write a result: %s", self.stream, err)
                    return
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)

    async def _complete(self, job: _Job, result: pb.Result) -> None:
        await self._complete_many([(job, result)])

    async def _complete_many(self, done: list[tuple[_Job, pb.Result]]) -> None:
        """Write each job's result and acknowledge it (`COMPLETE_MANY_LUA`: `COMPLETE_LUA` per job),
        in one script call: one round trip and one reply for a whole part. The script is idempotent
        (a result is set only if absent), so a call cut off is simply sent again."""
        args: list = [self.config.result_ttl_s, self.scorer_name, P.GROUP]
        for job, result in done:
            args += [job.keys.prefix, job.index, job.entry_id, job.gen, result.SerializeToString()]
        keys = (self.stream, P.done_key(self.scorer_name))
        try:
            wrote = await self.redis.evalsha(_COMPLETE_SHA, 2, *keys, *args)
        except redis.exceptions.NoScriptError:  # a restarted Redis forgot the script: send its text
            wrote = await self.redis.eval(P.COMPLETE_MANY_LUA, 2, *keys, *args)
        written = sum(int(w) for w in wrote)
        self.completed += written
        self.scored_again += len(done) - written  # another replica wrote those first

    async def _ack(self, job: _Job) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, P.GROUP, job.entry_id)
            pipe.xdel(self.stream, job.entry_id)
            await pipe.execute()

    async def _requeue(self, job: _Job, error: str | None) -> None:
        """Queue the job again (a new entry) after a scorer failure, remembering the error."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(job.keys.attempts, P.error_field(self.scorer_name, job.index), error or "scorer error")
            pipe.xadd(self.stream, self._fields(job, entry=True))
            pipe.xack(self.stream, P.GROUP, job.entry_id)
            pipe.xdel(self.stream, job.entry_id)
            await pipe.execute()

    def _fields(self, job: _Job, entry: bool = False) -> dict[str, str]:
        """The job's fields, the budget being what is left of it now: as a job entry (`entry`, a
        requeue) or spelt out (a dead letter)."""
        budget = None
        if job.budget_ms is not None:
            budget = int((job.expires - time.monotonic()) * 1000)
        make = P.job_entry if entry else P.job_fields
        return make(job.run, job.batch, job.index, job.deadline_ms, budget, job.gen)

    async def _bury(self, entry_id: str, fields: dict, error: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(
                P.dead_key(self.scorer_name),
                {**fields, "error": error, "consumer": self.name},
                maxlen=self.config.dead_maxlen,
                approximate=True,
            )
            pipe.xack(self.stream, P.GROUP, entry_id)
            pipe.xdel(self.stream, entry_id)
            await pipe.execute()

    async def _dead_letter(self, job: _Job, error: str, item_id: str = "") -> None:
        """Move the job to the dead-letter stream and write a failed Result for the trainer."""
        log.warning(
            "queue %s: job %s:%s item %d dead-lettered: %s", self.stream, job.run, job.batch, job.index, error
        )
        fields = self._fields(job)
        fields["attempts"] = str(job.attempt)
        result = pb.Result(id=item_id, score=math.nan, status=pb.Result.STATUS_SCORER_ERROR, error=error)

        async def write() -> None:
            await self.redis.xadd(
                P.dead_key(self.scorer_name),
                {**fields, "error": error, "consumer": self.name},
                maxlen=self.config.dead_maxlen,
                approximate=True,
            )
            await self._complete(job, result)

        await self._until_written(write, job)
