"""The stream consumer: a reward-server replica's second transport, next to its gRPC server.

It is a thin adapter, like the servicer: it reads jobs from the scorer's stream (consumer group
"replicas", shared by every replica of the scorer), decodes the protobuf Items, hands them to the
same `DynamicBatcher` as gRPC (which merges them within `max_queue_delay_ms` into batches of at most
`max_batch_size`), writes each result once and acknowledges the job.

Crash safety:
- A replica holds at most `prefetch` jobs. Every `heartbeat_ms` it re-claims the ones it is working
  on (XCLAIM ... JUSTID by itself), which resets their idle time, so a job still being scored is
  never taken over. A job whose replica died stops getting heartbeats; after `claim_min_idle_ms`
  another replica takes it over (XAUTOCLAIM) and scores it.
- Each start of a job counts an attempt. A job that fails (the scorer raised) is queued again; after
  `max_attempts` it goes to the dead-letter stream with its error, and a failed Result is written so
  the trainer sees a failed item, not a hang. A job whose replicas keep dying is caught the same way.
- After a Redis restart the group is gone (NOGROUP): the consumer recreates it and goes on; the
  client resubmits what was lost. Connection errors are retried with a capped backoff.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import redis
from google.protobuf.message import DecodeError

from protos.spie.reward.v1 import reward_pb2 as pb
from reward_servers.base import Scorer
from reward_servers.batcher import BatcherClosed, DeadlineExpired, DynamicBatcher, ItemOutcome, QueueFull
from reward_servers.images import DEFAULT_MAX_PIXELS, ImageError, decode_item, to_batch
from reward_servers.queue import protocol as P

log = logging.getLogger("spie.queue")
_STATUS = {
    "ok": pb.Result.STATUS_OK,
    "invalid_input": pb.Result.STATUS_INVALID_INPUT,
    "scorer_error": pb.Result.STATUS_SCORER_ERROR,
}
_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, OSError)


@dataclass(frozen=True)
class ConsumerConfig:
    # Redis URL (redis://, rediss://, unix://); empty: the REDIS_URL environment variable. The
    # password comes from the URL or REDIS_PASSWORD. With neither, `spie serve` runs gRPC only.
    url: str = ""
    # Most jobs one replica holds (read, not yet acknowledged); 0: twice the batch size, so the
    # next batch forms while one is scored and the rest stays in the stream for other replicas.
    prefetch: int = 0
    # Longest wait for new jobs in one XREADGROUP, in milliseconds.
    block_ms: int = 1000
    # A job pending this long without a heartbeat is taken over by another replica, in milliseconds.
    claim_min_idle_ms: int = 30000
    # How often a replica refreshes the jobs it is working on, in milliseconds (well below
    # claim_min_idle_ms, so a slow batch is never mistaken for a dead replica).
    heartbeat_ms: int = 5000
    # How often a replica looks for jobs abandoned by dead replicas, in milliseconds.
    claim_interval_ms: int = 2000
    # Times a job may be started before it goes to the dead-letter stream.
    max_attempts: int = 3
    # Approximate cap on entries kept in each dead-letter stream.
    dead_maxlen: int = 10000
    # Seconds a written result (and a batch's attempt counts) are kept.
    result_ttl_s: int = 3600

    def __post_init__(self) -> None:
        for name in ("block_ms", "claim_min_idle_ms", "heartbeat_ms", "claim_interval_ms", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"queue.{name} must be >= 1, got {getattr(self, name)}")
        if self.heartbeat_ms * 2 > self.claim_min_idle_ms:
            raise ValueError(
                f"queue.heartbeat_ms ({self.heartbeat_ms}) must be at most half of "
                f"queue.claim_min_idle_ms ({self.claim_min_idle_ms})"
            )


@dataclass
class _Job:
    entry_id: str
    run: str
    batch: str
    index: int
    deadline_ms: int
    keys: P.BatchKeys
    attempt: int = 0

    @property
    def field(self) -> str:
        return str(self.index)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class StreamConsumer:
    """Pulls jobs of one scorer from Redis into a `DynamicBatcher`.

    Args:
        scorer: the loaded scorer (its name picks the stream; its info is published for clients).
        batcher: the started batcher the gRPC server also uses.
        config: queue settings.
        password: Redis password when not in the URL (default: REDIS_PASSWORD).
        max_pixels: pixel cap of decoded images.
    """

    def __init__(
        self,
        scorer: Scorer,
        batcher: DynamicBatcher,
        config: ConsumerConfig,
        password: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        name: str | None = None,
    ) -> None:
        url = P.redis_url(config.url)
        if not url:
            raise ValueError("StreamConsumer: no Redis URL (queue.url or REDIS_URL)")
        self.scorer, self.batcher, self.config = scorer, batcher, config
        self.scorer_name = scorer.name
        self.stream = P.jobs_key(self.scorer_name)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.prefetch = config.prefetch or 2 * batcher.config.max_batch_size
        self.max_pixels = max_pixels
        self.url = url
        self.redis = P.connect(url, password, asyncio=True)
        self.completed = 0  # results this replica wrote first
        self._held: set[str] = set()  # entry ids read and not yet acknowledged
        self._freed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._loops: list[asyncio.Task] = []
        self._stopping = False
        self._decode = ThreadPoolExecutor(1, thread_name_prefix="queue-decode")

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the group if needed, publish the scorer's info and start reading."""
        await self._setup()
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._read_loop()), loop.create_task(self._heartbeat_loop())]
        log.info("queue consumer %s reading %s at %s", self.name, self.stream, P.describe(self.url))

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stop reading, finish the jobs in hand within `grace_s`, then disconnect. Jobs left
        unacknowledged are taken over by other replicas after `claim_min_idle_ms`."""
        self._stopping = True
        self._loops[0].cancel() if self._loops else None
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in [*self._loops, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)
        await self.redis.aclose()
        self._decode.shutdown(wait=False, cancel_futures=True)

    async def _setup(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, P.GROUP, id="0", mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise
        info = {
            "version": self.scorer.version,
            "model_id": self.scorer.model_id,
            "higher_is_better": "1" if self.scorer.higher_is_better else "0",
            "max_batch_size": str(self.batcher.config.max_batch_size),
        }
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(P.info_key(self.scorer_name), mapping=info)
            pipe.sadd(P.SCORERS_KEY, self.scorer_name)
            await pipe.execute()

    # ---- reading ---------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        backoff, next_claim = 0.05, 0.0
        while not self._stopping:
            try:
                free = self.prefetch - len(self._held)
                if free <= 0:
                    self._freed.clear()
                    await asyncio.wait_for(self._freed.wait(), self.config.block_ms / 1000)
                    continue
                if time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + self.config.claim_interval_ms / 1000
                    if await self._claim(free):
                        continue
                reply = await self.redis.xreadgroup(
                    P.GROUP, self.name, {self.stream: ">"}, count=free, block=self.config.block_ms
                )
                if reply:
                    self._dispatch(reply[0][1])
                backoff = 0.05
            except (TimeoutError, asyncio.TimeoutError):
                continue
            except redis.ResponseError as err:
                if "NOGROUP" not in str(err):
                    raise
                log.warning("queue %s: consumer group gone (Redis restarted?); recreating it", self.stream)
                await self._retry_setup()
            except _REDIS_DOWN as err:
                log.warning("queue %s: Redis unreachable (%s); retrying in %.2fs", self.stream, err, backoff)
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                if isinstance(err, redis.ConnectionError):
                    await self._retry_setup()

    async def _retry_setup(self) -> None:
        try:
            await self._setup()
        except _REDIS_DOWN:
            await asyncio.sleep(0.1)

    async def _claim(self, count: int) -> bool:
        """Take over jobs idle for longer than claim_min_idle_ms (their replica died)."""
        reply = await self.redis.xautoclaim(
            self.stream, P.GROUP, self.name, self.config.claim_min_idle_ms, "0-0", count=count
        )
        entries = [(i, f) for i, f in reply[1] if i is not None and f]
        if entries:
            log.info("queue %s: took over %d abandoned job(s)", self.stream, len(entries))
            self._dispatch(entries)
        return bool(entries)

    async def _heartbeat_loop(self) -> None:
        """Re-claim the jobs in hand so their idle time stays below claim_min_idle_ms."""
        while True:
            await asyncio.sleep(self.config.heartbeat_ms / 1000)
            held = list(self._held)
            if not held:
                continue
            try:
                await self.redis.xclaim(self.stream, P.GROUP, self.name, 0, held, justid=True)
            except (redis.ResponseError, *_REDIS_DOWN) as err:
                log.debug("queue %s: heartbeat failed: %s", self.stream, err)

    def _dispatch(self, entries: list) -> None:
        ids = [_text(entry_id) for entry_id, _ in entries]
        self._held.update(ids)
        task = asyncio.get_running_loop().create_task(self._process(entries))
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            self._held.difference_update(ids)
            self._freed.set()
            if not t.cancelled() and t.exception() is not None:
                log.error("queue %s: job batch failed: %r", self.stream, t.exception())

        task.add_done_callback(done)

    # ---- processing ------------------------------------------------------------------------------

    async def _process(self, entries: list) -> None:
        jobs, malformed = [], []
        for entry_id, fields in entries:
            f = {_text(k): _text(v) for k, v in fields.items()}
            try:
                keys = P.BatchKeys(f["run"], f["batch"])
                jobs.append(
                    _Job(_text(entry_id), f["run"], f["batch"], int(f["index"]), int(f["deadline_ms"]), keys)
                )
            except (KeyError, ValueError) as err:
                malformed.append((_text(entry_id), f, f"malformed job: {err}"))
        for entry_id, f, error in malformed:
            await self._until_written(lambda e=entry_id, f=f, err=error: self._bury(e, f, err), None)
        if jobs:
            await self._process_jobs(jobs)

    async def _process_jobs(self, jobs: list[_Job]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for job in jobs:
                pipe.hincrby(job.keys.attempts, f"{self.scorer_name}:{job.index}", 1)
                pipe.expire(job.keys.attempts, self.config.result_ttl_s)
                pipe.hget(job.keys.attempts, f"{self.scorer_name}:{job.index}:error")
                pipe.get(job.keys.blob(job.index))
            replies = await pipe.execute()
        now_ms = time.time() * 1000
        live, blobs = [], []
        for k, job in enumerate(jobs):
            job.attempt, last_error, blob = int(replies[4 * k]), replies[4 * k + 2], replies[4 * k + 3]
            if job.attempt > self.config.max_attempts:
                reason = _text(last_error) if last_error else "its replica died while scoring it"
                await self._dead_letter(job, f"gave up after {job.attempt - 1} attempts: {reason}")
            elif blob is None or job.deadline_ms <= now_ms:
                # Scored already (the blob is released by the last scorer), expired, or lost with a
                # Redis restart: nothing to score; the client resubmits what it is still missing.
                await self._until_written(lambda job=job: self._ack(job), job)
            else:
                live.append(job)
                blobs.append(blob)
        if not live:
            return
        loop = asyncio.get_running_loop()
        decoded = await loop.run_in_executor(self._decode, self._decode_all, blobs)
        # Each job finishes on its own, so its slot frees as soon as it is written.
        await asyncio.gather(*(self._finish(job, d) for job, d in zip(live, decoded, strict=True)))

    async def _finish(self, job: _Job, decoded) -> None:
        """Score one job and write its outcome; then free its slot for the next read."""
        try:
            outcome = await self._score(job, decoded)
            if outcome is None:
                return  # left pending: another replica takes it over
            item_id = decoded.id if not isinstance(decoded, Exception) else ""
            if outcome.kind == "expired":  # the client has moved on and resubmits if it still cares
                await self._until_written(lambda: self._ack(job), job)
            elif outcome.kind == "scorer_error" and job.attempt >= self.config.max_attempts:
                await self._dead_letter(
                    job, f"dead-lettered after {job.attempt} attempts: {outcome.error}", item_id
                )
            elif outcome.kind == "scorer_error":
                await self._until_written(lambda: self._requeue(job, outcome.error), job)
            else:
                result = pb.Result(id=item_id, score=outcome.score, status=_STATUS[outcome.kind])
                result.details.update(outcome.details)
                if outcome.error:
                    result.error = outcome.error
                await self._until_written(lambda: self._complete(job, result), job)
        finally:
            self._held.discard(job.entry_id)
            self._freed.set()

    def _decode_all(self, blobs: list[bytes]) -> list:
        out = []
        for blob in blobs:
            try:
                item = pb.Item.FromString(blob)
            except (DecodeError, ValueError) as err:
                out.append(ImageError(f"item payload is not a spie.reward.v1.Item: {err}"))
                continue
            try:
                out.append(decode_item(item, 0, self.max_pixels))
            except ImageError as err:
                out.append(ImageError(str(err).replace("item 0", f"item {item.id!r}", 1)))
        return out

    async def _score(self, job: _Job, decoded) -> ItemOutcome | None:
        """Score one job's item through the batcher; None when it could not be scored here."""
        if isinstance(decoded, Exception):
            return ItemOutcome(math.nan, {}, str(decoded), "invalid_input")
        deadline = time.monotonic() + (job.deadline_ms - time.time() * 1000) / 1000
        while True:
            try:
                return (await self.batcher.submit(to_batch([decoded]), deadline))[0]
            except QueueFull:
                await asyncio.sleep(0.02)  # gRPC traffic filled the queue; the job waits its turn
            except DeadlineExpired:
                return ItemOutcome(math.nan, {}, "deadline passed", "expired")
            except BatcherClosed:
                return None

    # ---- writing ---------------------------------------------------------------------------------

    async def _until_written(self, write, job: _Job | None) -> None:
        """Run `write()` until Redis takes it or the job's deadline passes (then the client resubmits)."""
        deadline = job.deadline_ms / 1000 if job is not None else time.time() + 30
        backoff = 0.05
        while True:
            try:
                await write()
                return
            except _REDIS_DOWN as err:
                if time.time() >= deadline or self._stopping:
                    log.warning("queue %s: could not write a result: %s", self.stream, err)
                    return
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)

    async def _complete(self, job: _Job, result: pb.Result) -> None:
        k = job.keys
        wrote = await self.redis.eval(
            P.COMPLETE_LUA,
            7,
            k.result(self.scorer_name, job.index),
            k.need(job.index),
            k.blob(job.index),
            k.signal,
            self.stream,
            k.attempts,
            P.done_key(self.scorer_name),
            result.SerializeToString(),
            self.config.result_ttl_s,
            self.scorer_name,
            f"{self.scorer_name} {job.index}",
            P.GROUP,
            job.entry_id,
            f"{self.scorer_name}:{job.index}",
        )
        self.completed += int(wrote)

    async def _ack(self, job: _Job) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, P.GROUP, job.entry_id)
            pipe.xdel(self.stream, job.entry_id)
            await pipe.execute()

    async def _requeue(self, job: _Job, error: str | None) -> None:
        """Queue the job again (a new entry) after a scorer failure, remembering the error."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(job.keys.attempts, f"{self.scorer_name}:{job.index}:error", error or "scorer error")
            pipe.xadd(self.stream, P.job_fields(job.run, job.batch, job.index, job.deadline_ms))
            pipe.xack(self.stream, P.GROUP, job.entry_id)
            pipe.xdel(self.stream, job.entry_id)
            await pipe.execute()

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
        fields = P.job_fields(job.run, job.batch, job.index, job.deadline_ms)
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
