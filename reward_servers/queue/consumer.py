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
- Each start of a job counts an attempt (per generation: a deliberate resubmission by the client is
  a new job with its own count, not a failed delivery). A job that fails (the scorer raised) is queued again; after
  `max_attempts` it goes to the dead-letter stream with its error, and a failed Result is written so
  the trainer sees a failed item, not a hang. A job whose replicas keep dying is caught the same way.
- After a Redis restart the group is gone (NOGROUP): the consumer recreates it and goes on; the
  client resubmits what was lost. Connection errors are retried with a capped backoff.
- Every Redis call about a job gets at most the time left before the job's deadline (plus a short
  grace for acknowledgements), so a frozen Redis cannot hold a slot for long. A job's deadline is a
  duration measured on Redis's clock (see protocol.py), so a replica whose clock runs ahead does not
  drop jobs.
- Consumers idle longer than `forget_idle_ms` with no pending job (a replica that died; its jobs
  were taken over) are removed from the group, so the group counts only live replicas.
- The images of one read decode to at most `max_decoded_bytes` at a time (checked from the headers
  first): a larger read is scored in parts; an item larger than that alone fails alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import redis

from reward_servers.base import Scorer
from reward_servers.batcher import DynamicBatcher
from reward_servers.budget import BudgetExceeded, DecodedBytesBudget
from reward_servers.images import DEFAULT_MAX_DECODED_MB, DEFAULT_MAX_PIXELS
from reward_servers.queue import protocol as P
from reward_servers.queue.blobs import BlobReader, blob_dir, is_reference
from reward_servers.queue.decoding import decode_all, parse_all, part_decoded_bytes, split_parts
from reward_servers.queue.finishing import JobFinishing
from reward_servers.queue.presence import ReplicaPresence, presence_interval_ms
from reward_servers.queue.writes import _REDIS_DOWN, WRITE_GRACE_S, JobWrites, _Job

log = logging.getLogger("spie.queue")


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
    # A consumer of the group idle this long with no pending job (its replica died) is removed from
    # the group, in milliseconds (checked every claim_interval_ms x 10).
    forget_idle_ms: int = 600000
    # Longest one Redis call may block a replica, in seconds (socket timeout).
    socket_timeout_s: float = 10.0
    # Shared folder of item payloads (the blob path, blobs.py): the folder the trainer's
    # reward.queue.blob_dir names, as this replica sees it; empty: SPIE_BLOB_DIR, else none (an item
    # sent by reference then fails with a line saying so).
    blob_dir: str = ""

    def __post_init__(self) -> None:
        for name in (
            "block_ms",
            "claim_min_idle_ms",
            "heartbeat_ms",
            "claim_interval_ms",
            "max_attempts",
            "forget_idle_ms",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"queue.{name} must be >= 1, got {getattr(self, name)}")
        if self.heartbeat_ms * 2 > self.claim_min_idle_ms:
            raise ValueError(
                f"queue.heartbeat_ms ({self.heartbeat_ms}) must be at most half of "
                f"queue.claim_min_idle_ms ({self.claim_min_idle_ms})"
            )
        if self.socket_timeout_s * 1000 <= self.block_ms:
            raise ValueError(
                f"queue.socket_timeout_s ({self.socket_timeout_s}) must exceed queue.block_ms ({self.block_ms})"
            )


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class StreamConsumer(JobFinishing, JobWrites, ReplicaPresence):
    """Pulls jobs of one scorer from Redis into a `DynamicBatcher`.

    Args:
        scorer: the loaded scorer (its name picks the stream; its info is published for clients).
        batcher: the started batcher the gRPC server also uses.
        config: queue settings.
        password: Redis password when not in the URL (default: REDIS_PASSWORD).
        max_pixels: pixel cap of decoded images.
        max_decoded_bytes: most bytes the images of one read decode to at a time.
    """

    def __init__(
        self,
        scorer: Scorer,
        batcher: DynamicBatcher,
        config: ConsumerConfig,
        password: str | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        name: str | None = None,
        max_decoded_bytes: int = DEFAULT_MAX_DECODED_MB * 1024 * 1024,
        decoded_budget: DecodedBytesBudget | None = None,
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
        self.max_decoded_bytes = max_decoded_bytes
        # The server's one budget, shared with its gRPC requests (None: this consumer's own).
        self.decoded_budget = decoded_budget or DecodedBytesBudget(max_decoded_bytes)
        self.url = url
        timeout = config.socket_timeout_s
        self.redis = P.connect(
            url, password, asyncio=True, socket_timeout=timeout, socket_connect_timeout=min(5.0, timeout)
        )
        self._clock_offset_ms = 0.0  # Redis's clock minus ours (TIME), for job deadlines
        self.completed = 0  # results this replica wrote first
        self._held: set[str] = set()  # entry ids read and not yet acknowledged
        self._freed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._loops: list[asyncio.Task] = []
        self._stopping = False
        self._decode = ThreadPoolExecutor(1, thread_name_prefix="queue-decode")
        self.blobs = BlobReader(blob_dir(config.blob_dir))
        self._presence_init()

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Create the group if needed, publish the scorer's info and start reading."""
        await self._setup()
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._read_loop()), loop.create_task(self._heartbeat_loop())]
        log.info("queue consumer %s reading %s at %s", self.name, self.stream, P.describe(self.url))

    async def stop(self, grace_s: float = 30.0) -> None:
        """Drain: stop reading (the read in progress ends by itself within block_ms, so nothing it
        delivered is dropped), finish the jobs in hand within `grace_s`, deregister, disconnect.
        Jobs left unacknowledged are taken over by other replicas after `claim_min_idle_ms`."""
        self._stopping = self._draining = True
        deadline = time.monotonic() + grace_s
        if self._loops:
            await asyncio.wait({self._loops[0]}, timeout=self.config.block_ms / 1000 + 1.0)
        with contextlib.suppress(*_REDIS_DOWN, redis.RedisError, asyncio.TimeoutError):
            await asyncio.wait_for(self._refresh_presence(), 2.0)  # shows "draining"
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=max(0.0, deadline - time.monotonic()))
        for task in [*self._loops, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)
        await self._deregister()
        await self.redis.aclose()
        self._decode.shutdown(wait=False, cancel_futures=True)

    async def _sync_clock(self) -> None:
        """Measure Redis's clock against ours (job deadlines are on Redis's clock)."""
        before = time.time()
        seconds, micros = await self.redis.time()
        after = time.time()
        self._clock_offset_ms = (seconds + micros / 1e6 - (before + after) / 2) * 1000

    def _redis_now_ms(self) -> float:
        return time.time() * 1000 + self._clock_offset_ms

    def _expires(self, entry_id: str, fields: dict[str, str]) -> tuple[float, int | None]:
        """(local monotonic deadline, budget) of a job: its budget from the entry's creation on
        Redis's clock; a job without a budget (an older client) uses its wall-clock deadline."""
        budget = fields.get("budget_ms")
        if budget is not None:
            budget_ms = int(budget)
            left_ms = P.entry_ms(entry_id) + budget_ms - self._redis_now_ms()
            return time.monotonic() + left_ms / 1000, budget_ms
        return time.monotonic() + (int(fields["deadline_ms"]) - time.time() * 1000) / 1000, None

    async def _setup(self) -> None:
        await self._sync_clock()
        try:
            await self.redis.xgroup_create(self.stream, P.GROUP, id="0", mkstream=True)
            if self._started_ms:  # set up before: a reconnect found the group gone
                log.warning("queue %s: consumer group gone (Redis restarted?); recreated it", self.stream)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise
        await self._register()
        info = {
            "version": self.scorer.version,
            "model_id": self.scorer.model_id,
            "higher_is_better": "1" if self.scorer.higher_is_better else "0",
            "max_batch_size": str(self.batcher.config.max_batch_size),
        }
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(P.info_key(self.scorer_name), mapping=info)
            pipe.sadd(P.SCORERS_KEY, self.scorer_name)
            pipe.script_load(P.COMPLETE_MANY_LUA)  # results are written by EVALSHA (writes.py)
            await pipe.execute()

    # ---- reading ---------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        backoff, next_claim, next_forget = 0.05, 0.0, 0.0
        while not self._stopping:
            try:
                free = self.prefetch - len(self._held)
                if free <= 0:
                    self._freed.clear()
                    await asyncio.wait_for(self._freed.wait(), self.config.block_ms / 1000)
                    continue
                if time.monotonic() >= next_forget:
                    next_forget = time.monotonic() + 10 * self.config.claim_interval_ms / 1000
                    await self._forget_dead_consumers()
                    await self._sync_clock()
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
        """Re-claim the jobs in hand so their idle time stays below claim_min_idle_ms, and refresh
        this replica's presence entry."""
        tick_s, claimed = presence_interval_ms(self.config.heartbeat_ms) / 1000, time.monotonic()
        while True:
            await asyncio.sleep(tick_s)
            held = list(self._held)
            try:
                await self._refresh_presence()  # every second: replica counts resolve in seconds
                if held and time.monotonic() - claimed >= self.config.heartbeat_ms / 1000 - 1e-3:
                    claimed = time.monotonic()
                    await self.redis.xclaim(self.stream, P.GROUP, self.name, 0, held, justid=True)
            except (redis.ResponseError, *_REDIS_DOWN) as err:
                log.debug("queue %s: heartbeat failed: %s", self.stream, err)

    def _dispatch(self, entries: list) -> None:
        ids = [_text(entry_id) for entry_id, _ in entries]
        self._held.update(ids)
        self._busy_update()
        task = asyncio.get_running_loop().create_task(self._process(entries))
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            self._held.difference_update(ids)
            self._busy_update()
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
                f = P.parse_job_entry(f)
            except ValueError as err:
                malformed.append((_text(entry_id), f, f"malformed job: {err}"))
                continue
            try:
                keys = P.BatchKeys(f["run"], f["batch"])
                expires, budget_ms = self._expires(_text(entry_id), f)
                jobs.append(
                    _Job(
                        _text(entry_id),
                        f["run"],
                        f["batch"],
                        int(f["index"]),
                        int(f["deadline_ms"]),
                        keys,
                        expires,
                        budget_ms,
                        int(f.get("gen", "0")),
                        scorer=self.scorer_name,
                    )
                )
            except (KeyError, ValueError) as err:
                malformed.append((_text(entry_id), f, f"malformed job: {err}"))
        for entry_id, f, error in malformed:
            await self._until_written(lambda e=entry_id, f=f, err=error: self._bury(e, f, err), None)
        if jobs:
            await self._process_jobs(jobs)

    def _parse(self, blobs: list[bytes]) -> list:
        """Each blob as a `pb.Item` (an ImageError for a bad one); blob references read from the
        shared folder first (blobs.py), None where the file is gone. Runs on the decode thread."""
        if not any(map(is_reference, blobs)):
            return parse_all(blobs)
        payloads = self.blobs.resolve(blobs)
        parsed = iter(parse_all([b for b in payloads if b is not None]))
        return [None if b is None else next(parsed) for b in payloads]

    async def _process_jobs(self, jobs: list[_Job]) -> None:
        async def start() -> list:  # one script call: an attempt counted, last error, blob (protocol.py)
            names, args = [], [self.config.result_ttl_s]
            for job in jobs:
                names += [job.keys.attempts, job.keys.blob(job.index)]
                args += [job.attempts_field, P.error_field(self.scorer_name, job.index)]
            return await self.redis.eval(P.START_LUA, len(names), *names, *args)

        replies = await self._bounded(start(), max(job.expires for job in jobs), WRITE_GRACE_S)
        now = time.monotonic()
        live, blobs = [], []
        for k, job in enumerate(jobs):
            job.attempt, last_error, blob = int(replies[3 * k]), replies[3 * k + 1], replies[3 * k + 2]
            if job.attempt > self.config.max_attempts:
                reason = _text(last_error) if last_error else "its replica died while scoring it"
                await self._dead_letter(job, f"gave up after {job.attempt - 1} attempts: {reason}")
            elif blob is None or job.expires <= now:
                # Scored already (the blob is released by the last scorer), expired, or lost with a
                # Redis restart: nothing to score; the client resubmits what it is still missing.
                await self._until_written(lambda job=job: self._ack(job), job)
            else:
                live.append(job)
                blobs.append(blob)
        if not live:
            return
        loop = asyncio.get_running_loop()
        items = await loop.run_in_executor(self._decode, self._parse, blobs)
        pairs = list(zip(live, items, strict=True))
        for job in [job for job, item in pairs if item is None]:
            # On the blob path: its batch file is gone (the client gathered the batch): as above.
            await self._until_written(lambda job=job: self._ack(job), job)
        pairs = [(job, item) for job, item in pairs if item is not None]
        # Score in parts whose images decode to at most max_decoded_bytes (from the headers); a
        # part is one batcher request and one pipelined write (finishing.py).
        # Each part reserves what it decodes to from the server's budget (shared with gRPC) until scored.
        for part in split_parts(pairs, self.max_decoded_bytes):
            nbytes = part_decoded_bytes([it for _, it in part])
            try:
                async with self.decoded_budget.hold(nbytes, max(job.expires for job, _ in part)):
                    decoded = await loop.run_in_executor(
                        self._decode, decode_all, [it for _, it in part], self.max_pixels
                    )
                    await self._finish_part([job for job, _ in part], decoded)
            except BudgetExceeded as err:  # the deadline passed waiting for memory: the client resubmits
                await self._finish_part([job for job, _ in part], [err] * len(part))
