"""How a replica scores one part of a read and writes its outcomes, at a cost per read, not per job.

A part's decodable items go to the batcher as one request (one future, one wake-up), and the
results of every job scored fine are written by one script call (`protocol.COMPLETE_MANY_LUA`): one
round trip and one reply per part instead of one per job. Each job is still its own stream entry,
written and acknowledged as before (result set only if absent, blob released, signal, ack), so
per-job guarantees hold as before: a job is scored at most once into its result key, a job left
unacknowledged by a dead replica is reclaimed alone, and a failing job is requeued or dead-lettered
alone (expired, requeued and dead-lettered jobs are written one by one, as before).

`StreamConsumer` (consumer.py) inherits this; it uses its `batcher`, `config`, `_held`,
`_busy_update`, `_freed` and the writes of `JobWrites` (writes.py).
"""

from __future__ import annotations

import asyncio
import math

from protos.spie.reward.v1 import reward_pb2 as pb
from reward_servers.batcher import BatcherClosed, DeadlineExpired, ItemOutcome, QueueFull
from reward_servers.budget import BudgetExceeded
from reward_servers.images import to_batch
from reward_servers.queue.writes import _Job
from reward_servers.results import fill_result


def _item_id(decoded) -> str:
    return decoded.id if not isinstance(decoded, Exception) else getattr(decoded, "item_id", "")


def _result(item_id: str, outcome: ItemOutcome) -> pb.Result:
    return fill_result(pb.Result(id=item_id), outcome)


class JobFinishing:
    async def _finish_part(self, jobs: list[_Job], decoded: list) -> None:
        """Score a part's jobs (`decoded[k]`: job k's DecodedItem, or the error that stops it) and
        write each outcome; then free their slots for the next read."""
        try:
            outcomes = await self._score_part(jobs, decoded)
            completes, others = [], []
            for job, item, outcome in zip(jobs, decoded, outcomes, strict=True):
                if outcome is None:
                    continue  # left pending: another replica takes it over
                retry = outcome.kind == "scorer_error" and outcome.retry
                if outcome.kind == "expired":  # the client has moved on and resubmits if it still cares
                    others.append(self._until_written(lambda job=job: self._ack(job), job))
                elif retry and job.attempt >= self.config.max_attempts:
                    error = f"dead-lettered after {job.attempt} attempts: {outcome.error}"
                    others.append(self._dead_letter(job, error, _item_id(item)))
                elif retry:  # a replica may fail where another will not
                    others.append(
                        self._until_written(lambda job=job, o=outcome: self._requeue(job, o.error), job)
                    )
                else:
                    completes.append((job, _result(_item_id(item), outcome)))
            if completes:
                last = max((job for job, _ in completes), key=lambda j: j.expires)
                await self._until_written(lambda: self._complete_many(completes), last)
            await asyncio.gather(*others)
        finally:
            for job in jobs:
                self._held.discard(job.entry_id)
            self._busy_update()
            self._freed.set()

    async def _score_part(self, jobs: list[_Job], decoded: list) -> list[ItemOutcome | None]:
        """Each job's outcome (None: it could not be scored here). The decodable items go to the
        batcher as one request, until the latest of their deadlines (a job past its own deadline
        by then is written anyway: its result is simply not awaited any more)."""
        out: list[ItemOutcome | None] = [None] * len(jobs)
        ok = []
        for k, item in enumerate(decoded):
            if isinstance(item, BudgetExceeded):
                out[k] = ItemOutcome(
                    math.nan, {}, f"deadline passed waiting for decoded memory: {item}", "expired"
                )
            elif isinstance(item, Exception):
                out[k] = ItemOutcome(math.nan, {}, str(item), "invalid_input")
            else:
                ok.append(k)
        if not ok:
            return out
        deadline = max(jobs[k].expires for k in ok)
        while True:
            try:
                scored = await self.batcher.submit(to_batch([decoded[k] for k in ok]), deadline)
                break
            except QueueFull:
                await asyncio.sleep(0.02)  # gRPC traffic filled the queue; the jobs wait their turn
            except DeadlineExpired:
                scored = [ItemOutcome(math.nan, {}, "deadline passed", "expired")] * len(ok)
                break
            except BatcherClosed:
                return out
        for k, outcome in zip(ok, scored, strict=True):
            out[k] = outcome
        return out
