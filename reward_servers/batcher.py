"""A dynamic batcher in the manner of Triton's: requests wait up to `max_queue_delay_ms` to be merged
into one scorer call of at most `max_batch_size` items.

It also waits for the requests it can expect: callers answered by a batch usually send their next
request at once, a few milliseconds later. So the batcher counts the most requests outstanding at
once (queued or being scored) while a batch is scored, and the next batch waits until that many
requests are queued (or it is full), for at most `max_expect_delay_ms` after the last batch was
answered. Clients in lock-step (a training loop's workers, many single-item callers) then fill
batches instead of each missing the window by a round trip (or splitting into groups that take
turns); a lone caller's batch goes as soon as its request is in. Where callers leave, one batch
waits up to `max_expect_delay_ms` in vain, and the next expects fewer.

It is transport-independent: the gRPC servicer and the Redis consumer both hand it a `ScoreBatch`
per request and await one `ItemOutcome` per item. The scorer runs on one worker thread (one device),
so the event loop keeps admitting requests while a batch is scored; whatever queues up meanwhile
forms the next batch.

- The queue is bounded in items; a request that does not fit is refused at once (`QueueFull`,
  RESOURCE_EXHAUSTED on gRPC).
- Each request may carry a deadline (`time.monotonic()` seconds). An item whose deadline passes
  while queued is dropped and its request fails with `DeadlineExpired` (DEADLINE_EXCEEDED).
- If the scorer raises on a batch, every item is scored again alone, so one poisonous item fails
  alone and the rest are still scored.
- With `cache_items` > 0, an item already scored successfully is answered from the score cache
  (`cache.py`) without queueing: the scorer never sees it again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reward_servers.base import DEFAULT_MAX_TEXT_BYTES, ScoreBatch, ScoreResult, clean_texts, utf8_safe
from reward_servers.cache import ScoreCache, item_key
from reward_servers.metrics import Metrics


class QueueFull(Exception):
    """The queue has no room for the request."""


class DeadlineExpired(Exception):
    """The request's deadline passed before it was scored."""


class BatcherClosed(Exception):
    """The batcher is shut down (the server is draining)."""


@dataclass(frozen=True)
class BatcherConfig:
    # Largest number of items in one scorer call (capped by the scorer's own max_batch_size).
    max_batch_size: int = 32
    # How long the oldest queued item may wait for the batch to fill, in milliseconds (0: no waiting).
    max_queue_delay_ms: float = 5.0
    # Most items that may wait in the queue; a request that does not fit gets QueueFull.
    max_queue_size: int = 1024
    # Successful outcomes kept in the score cache, keyed by (scorer, version, item inputs); 0: no cache.
    cache_items: int = 0
    # Most UTF-8 bytes of texts (a judge's reasoning) one item's result carries; longer ones are cut
    # with a "[truncated: ...]" marker (base.clean_texts).
    max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES
    # How long after the last batch was answered the next one may wait for the requests the batcher
    # expects (as many as were outstanding at once: their callers come back once answered), in
    # milliseconds; the batch goes as soon as they are all in (or it is full). 0: no such wait
    # (max_queue_delay_ms alone). Last, so positional construction keeps its meaning.
    max_expect_delay_ms: float = 20.0

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")
        if self.max_expect_delay_ms < 0:
            raise ValueError(f"max_expect_delay_ms must be >= 0, got {self.max_expect_delay_ms}")
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {self.max_queue_size}")
        if self.cache_items < 0:
            raise ValueError(f"cache_items must be >= 0, got {self.cache_items}")
        if self.max_text_bytes < 256:
            raise ValueError(f"max_text_bytes must be >= 256, got {self.max_text_bytes}")


@dataclass
class ItemOutcome:
    """The result of one item: `kind` is "ok", "invalid_input" (the scorer rejected the item) or
    "scorer_error" (the scorer raised, or returned NaN or inf). `retry` is False where trying again
    cannot help (a NaN or inf score depends on the item alone): the queue fails the item at once."""

    score: float
    details: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    kind: str = "ok"
    gradient: np.ndarray | None = None  # (3, H, W) d score / d edit, for items that asked
    texts: dict[str, str] = field(default_factory=dict)  # named strings (a judge's reasoning)
    retry: bool = True


class _Request:
    """One submitted request: its future and the outcomes gathered so far."""

    def __init__(self, n: int, deadline: float | None, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[list[ItemOutcome]] = loop.create_future()
        self.outcomes: list[ItemOutcome | None] = [None] * n
        self.pending = n
        self.deadline = deadline

    def resolve(self, index: int, outcome: ItemOutcome) -> None:
        if self.future.done():
            return
        self.outcomes[index] = outcome
        self.pending -= 1
        if self.pending == 0:
            self.future.set_result(list(self.outcomes))  # type: ignore[arg-type]

    def fail(self, err: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(err)
            self.future.exception()  # mark retrieved: the caller may already have gone


@dataclass
class _Entry:
    request: _Request
    index: int
    fields: tuple[Any, ...]  # (edited, source, instruction, mask, exemplars, metadata, tensor, want_gradient)
    enqueued: float
    key: bytes | None = None  # score-cache key (None: no cache)


def _slice(batch: ScoreBatch, i: int) -> tuple[Any, ...]:
    return (
        batch.edited[i],
        batch.sources[i],
        batch.instructions[i],
        batch.mask(i),
        list(batch.exemplar_list(i)),
        batch.meta(i),
        batch.tensor(i),
        batch.wants_gradient(i),
    )


def _assemble(rows: list[tuple[Any, ...]]) -> ScoreBatch:
    """Per-item field tuples -> one ScoreBatch."""
    cols = list(zip(*rows, strict=True))
    return ScoreBatch(*[list(c) for c in cols])


class DynamicBatcher:
    """Merge concurrent requests into scorer calls.

    Args:
        score_fn: the scorer's `score(batch) -> ScoreResult`; called on one worker thread.
        config: batching limits.
        metrics: optional Prometheus metrics to update.
        cache_namespace: what the score cache's keys start with: the scorer's name, version and
            model id (used when `config.cache_items` > 0).
    """

    def __init__(
        self,
        score_fn: Callable[[ScoreBatch], ScoreResult],
        config: BatcherConfig,
        metrics: Metrics | None = None,
        cache_namespace: str = "",
    ) -> None:
        self.score_fn = score_fn
        self.config = config
        self.metrics = metrics
        self.cache = ScoreCache(config.cache_items) if config.cache_items else None
        self.cache_namespace = cache_namespace
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # size -> number of batches
        self._queue: collections.deque[_Entry] = collections.deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer")
        self._task: asyncio.Task | None = None
        self._flush = False  # drain mode: no waiting for batches to fill
        self._closed = False
        # The expectation (see the module's docstring): requests queued since the last batch was
        # taken, requests left queued then, requests in the batch being scored, the most requests
        # outstanding at once since then, and when the last batch was answered.
        self._arrivals = self._leftover = self._scoring = self._peak = 0
        self._expected = 0
        self._answered_at = 0.0

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    async def submit(self, batch: ScoreBatch, deadline: float | None = None) -> list[ItemOutcome]:
        """Queue a request's items and wait for their outcomes, in order.

        Args:
            batch: the request's N items.
            deadline: absolute `time.monotonic()` time after which the request is dropped.

        Raises:
            QueueFull, DeadlineExpired, BatcherClosed.
        """
        if self._closed:
            raise BatcherClosed("the scorer is shutting down")
        n = len(batch)
        if n == 0:
            return []
        loop = asyncio.get_running_loop()
        keys: list[bytes | None] = [None] * n
        cached: dict[int, ItemOutcome] = {}
        if self.cache is not None:
            # Hashing the pixels runs off the event loop; hits never reach the queue.
            keys = await loop.run_in_executor(None, self._keys, batch)
            for i, key in enumerate(keys):
                if batch.wants_gradient(i):
                    keys[i] = None  # a gradient is never cached: the item is scored afresh
                    continue
                outcome = self.cache.get(key)
                if outcome is not None:
                    cached[i] = outcome
            self._count_cache(len(cached), n - len(cached))
        misses = n - len(cached)
        if len(self._queue) + misses > self.config.max_queue_size:
            raise QueueFull(
                f"queue full: {len(self._queue)} items waiting, {misses} more requested, "
                f"limit {self.config.max_queue_size}"
            )
        now = time.monotonic()
        if deadline is not None and deadline <= now:
            raise DeadlineExpired("deadline passed before the request was queued")
        request = _Request(n, deadline, loop)
        for i, outcome in cached.items():
            request.resolve(i, outcome)
        if not misses:
            return await request.future
        for i in range(n):
            if i not in cached:
                self._queue.append(_Entry(request, i, _slice(batch, i), now, keys[i]))
        self._arrivals += 1
        self._peak = max(self._peak, self._leftover + self._arrivals + self._scoring)
        self._set_depth()
        self._arrived.set()
        try:
            if deadline is None:
                return await request.future
            return await asyncio.wait_for(asyncio.shield(request.future), deadline - time.monotonic())
        except (TimeoutError, asyncio.TimeoutError):
            request.fail(DeadlineExpired("deadline passed"))
            raise DeadlineExpired("deadline passed while the request was being scored") from None
        finally:
            # A cancelled or timed-out caller leaves dead entries; the loop skips them.
            if not request.future.done():
                request.fail(DeadlineExpired("caller went away"))

    async def run_exclusive(self, fn: Callable[..., Any], *args: Any, deadline: float | None = None) -> Any:
        """Run `fn(*args)` on the scorer's worker thread (between batches: one device, one user), for
        calls that are not scoring (the Ground RPC). Raises DeadlineExpired past `deadline`."""
        if self._closed:
            raise BatcherClosed("the scorer is shutting down")
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        if deadline is None:
            return await future
        try:
            return await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()))
        except (TimeoutError, asyncio.TimeoutError):
            raise DeadlineExpired("deadline passed while the request was being served") from None

    def _keys(self, batch: ScoreBatch) -> list[bytes]:
        return [item_key(self.cache_namespace, _slice(batch, i)) for i in range(len(batch))]

    def _count_cache(self, hits: int, misses: int) -> None:
        if self.metrics is not None and self.cache is not None:
            self.metrics.cache_hits.inc(hits)
            self.metrics.cache_misses.inc(misses)
            self.metrics.cache_hit_ratio.set(self.cache.hit_ratio)

    def begin_drain(self) -> None:
        """Score whatever is queued without waiting for batches to fill (still accepting requests)."""
        self._flush = True
        self._arrived.set()

    async def close(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests, finish the queued ones within `timeout_s`, then stop."""
        self._closed = True
        self.begin_drain()
        if self._task is not None:
            # On timeout wait_for cancels the loop; what is still queued fails below.
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._task, timeout_s)
        for entry in self._queue:
            entry.request.fail(BatcherClosed("the scorer shut down before scoring the request"))
        self._queue.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))

    def _take(self) -> list[_Entry]:
        """Pop up to max_batch_size live entries, failing expired ones."""
        now = time.monotonic()
        taken: list[_Entry] = []
        while self._queue and len(taken) < self.config.max_batch_size:
            entry = self._queue.popleft()
            request = entry.request
            if request.future.done():
                continue
            if request.deadline is not None and request.deadline <= now:
                request.fail(DeadlineExpired("deadline passed while queued"))
                if self.metrics is not None:
                    self.metrics.error("deadline")
                continue
            taken.append(entry)
        self._set_depth()
        self._arrivals = 0
        self._scoring = len({id(e.request) for e in taken})
        self._leftover = len({id(e.request) for e in self._queue})
        self._peak = self._scoring + self._leftover
        return taken

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.config.max_queue_delay_ms / 1000.0
        expect = (
            max(delay, self.config.max_expect_delay_ms / 1000.0) if self.config.max_expect_delay_ms else 0.0
        )
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            # Wait for the batch to fill, at most `delay` after the oldest item arrived; or, when
            # requests are expected, until they are all in, at most `expect` after it.
            while len(self._queue) < self.config.max_batch_size and not self._flush:
                waiting = self._expected > 0 and expect > 0
                if waiting and self._leftover + self._arrivals >= self._expected:
                    break
                until = self._queue[0].enqueued + delay
                if waiting:  # the callers answered last come back within `expect` of their answer
                    until = max(until, self._answered_at + expect)
                remaining = until - time.monotonic()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except (TimeoutError, asyncio.TimeoutError):
                    break
                if not self._queue:
                    break
            entries = self._take()
            if not entries:
                continue
            outcomes = await loop.run_in_executor(
                self._executor, self._score, _assemble([e.fields for e in entries])
            )
            for entry, outcome in zip(entries, outcomes, strict=True):
                if self.cache is not None and entry.key is not None and outcome.kind == "ok":
                    self.cache.put(entry.key, outcome)
                entry.request.resolve(entry.index, outcome)
            # Expect as many requests as were outstanding at once during this batch.
            self._expected, self._scoring = self._peak, 0
            self._answered_at = time.monotonic()
            # Drop the batch before waiting for the next one: its decoded images count against the
            # server's decoded budget until their requests give them back (budget.py).
            del entries, outcomes

    def _score(self, batch: ScoreBatch) -> list[ItemOutcome]:
        """Run the scorer on one batch (worker thread); isolate failures item by item."""
        n = len(batch)
        start = time.perf_counter()
        try:
            outcomes = self._call(batch)
        except Exception:
            outcomes = []
            for i in range(n):
                try:
                    outcomes.extend(self._call(_assemble([_slice(batch, i)])))
                except Exception as err:
                    outcomes.append(
                        ItemOutcome(
                            math.nan,
                            {},
                            utf8_safe(f"scorer error: {type(err).__name__}: {err}"),
                            "scorer_error",
                        )
                    )
        self.batch_sizes[n] += 1
        if self.metrics is not None:
            self.metrics.batch_size.observe(n)
            self.metrics.batch_seconds.observe(time.perf_counter() - start)
            ok = sum(o.kind == "ok" for o in outcomes)
            self.metrics.items_scored.inc(ok)
            self.metrics.error("invalid_input", sum(o.kind == "invalid_input" for o in outcomes))
            self.metrics.error("scorer_error", sum(o.kind == "scorer_error" for o in outcomes))
        return outcomes

    def _call(self, batch: ScoreBatch) -> list[ItemOutcome]:
        result = self.score_fn(batch)
        if len(result.scores) != len(batch):
            raise RuntimeError(f"scorer returned {len(result.scores)} scores for {len(batch)} items")
        outcomes = []
        rows = zip(result.scores, result.details, result.errors, result.gradients, result.texts, strict=True)
        for score, details, error, gradient, texts in rows:
            if error is not None:
                outcomes.append(ItemOutcome(math.nan, {}, utf8_safe(str(error)), "invalid_input"))
            elif not np.isfinite(score):
                outcomes.append(
                    ItemOutcome(
                        math.nan, {}, f"scorer returned {score} for this item", "scorer_error", retry=False
                    )
                )
            else:
                outcomes.append(
                    ItemOutcome(
                        float(score),
                        {utf8_safe(str(k)): float(v) for k, v in details.items()},
                        gradient=gradient,
                        texts=clean_texts(texts, self.config.max_text_bytes),
                    )
                )
        return outcomes
