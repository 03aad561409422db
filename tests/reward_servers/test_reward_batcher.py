"""The dynamic batcher on its own (no transport): merging, bounds, deadlines, failure isolation."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from reward_servers.base import ScoreBatch, ScoreResult, build_scorer
from reward_servers.batcher import BatcherClosed, BatcherConfig, DeadlineExpired, DynamicBatcher, QueueFull


def one(rng, instruction: str = "x") -> ScoreBatch:
    edit = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    return ScoreBatch([edit], [edit], [instruction])


def test_concurrent_requests_merge_into_one_batch(rng):
    scorer = build_scorer("brightness")

    async def main():
        batcher = DynamicBatcher(scorer.score, BatcherConfig(max_batch_size=8, max_queue_delay_ms=200))
        batcher.start()
        batches = [one(rng) for _ in range(8)]
        results = await asyncio.gather(*(batcher.submit(b, time.monotonic() + 10) for b in batches))
        await batcher.close()
        return batcher, batches, results

    batcher, batches, results = asyncio.run(main())
    assert dict(batcher.batch_sizes) == {8: 1}  # the full batch went at once, before the delay
    for b, r in zip(batches, results, strict=True):
        assert r[0].kind == "ok" and r[0].score == pytest.approx(b.edited[0].mean() / 255)


class Gate:
    """A brightness scorer whose calls wait for `open` (so the queue can be filled behind it)."""

    def __init__(self):
        self.inner = build_scorer("brightness")
        self.open, self.entered = threading.Event(), threading.Event()
        self.seen: list[int] = []

    def score(self, batch):
        self.entered.set()
        assert self.open.wait(10)
        self.seen.append(len(batch))
        return self.inner.score(batch)


def test_queue_full_and_deadline_in_queue(rng):
    gate = Gate()

    async def main():
        batcher = DynamicBatcher(
            gate.score, BatcherConfig(max_batch_size=4, max_queue_delay_ms=0, max_queue_size=3)
        )
        batcher.start()
        busy = asyncio.ensure_future(batcher.submit(one(rng), time.monotonic() + 10))
        while not gate.entered.is_set():
            await asyncio.sleep(0.005)
        # The worker is busy; this request waits in the queue past its deadline.
        doomed = asyncio.ensure_future(batcher.submit(one(rng), time.monotonic() + 0.05))
        filler = asyncio.ensure_future(
            batcher.submit(ScoreBatch(*([one(rng).edited[0]] * 2,) * 2, ["a", "b"]))
        )
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await batcher.submit(one(rng))
        with pytest.raises(DeadlineExpired):
            await doomed
        gate.open.set()
        assert (await busy)[0].kind == "ok"
        assert [o.kind for o in await filler] == ["ok", "ok"]
        await batcher.close()
        with pytest.raises(BatcherClosed):
            await batcher.submit(one(rng))

    asyncio.run(main())
    assert gate.seen == [1, 2]  # the expired item never reached the scorer


class Fussy:
    """Raises on the whole batch when any instruction is "boom"; flags "bad" as a per-item error."""

    def score(self, batch):
        if "boom" in batch.instructions:
            raise RuntimeError("kaboom")
        errors = ["bad item" if t == "bad" else None for t in batch.instructions]
        return ScoreResult(np.arange(len(batch), dtype=float) + 1, errors=errors)


def test_a_failing_item_fails_alone(rng):
    async def main():
        batcher = DynamicBatcher(Fussy().score, BatcherConfig(max_batch_size=8, max_queue_delay_ms=50))
        batcher.start()
        e = one(rng).edited[0]
        out = await batcher.submit(
            ScoreBatch([e] * 4, [e] * 4, ["a", "boom", "bad", "b"]), time.monotonic() + 5
        )
        await batcher.close()
        return out

    out = asyncio.run(main())
    assert [o.kind for o in out] == ["ok", "scorer_error", "invalid_input", "ok"]
    assert "kaboom" in out[1].error and out[2].error == "bad item"


def _closed_loop(rng, callers: int, rounds: int, expect_ms: float) -> tuple[dict, float]:
    """`callers` clients each submitting one item, again as soon as answered, `rounds` times, to a
    scorer that takes 20 ms per call; returns (batch sizes, median seconds per call)."""
    scorer = build_scorer("brightness")

    def slow(batch):
        time.sleep(0.02)
        return scorer.score(batch)

    async def main():
        config = BatcherConfig(max_batch_size=32, max_queue_delay_ms=1, max_expect_delay_ms=expect_ms)
        batcher = DynamicBatcher(slow, config)
        batcher.start()
        calls = []

        async def caller(k: int) -> None:
            await asyncio.sleep(0.003 * k)  # they start apart, as real clients do
            for _ in range(rounds):
                t = time.monotonic()
                await batcher.submit(one(rng), time.monotonic() + 10)
                calls.append(time.monotonic() - t)
                await asyncio.sleep(0.002)  # the client's own turnaround, longer than the window

        await asyncio.gather(*(caller(k) for k in range(callers)))
        await batcher.close()
        return dict(batcher.batch_sizes), sorted(calls)[len(calls) // 2]

    return asyncio.run(main())


def test_the_batcher_waits_for_the_callers_it_expects(rng):
    """Closed-loop callers come back a round trip after their answer, past max_queue_delay_ms: with
    the expectation their requests still go together, without it they trickle in."""
    with_expect, _ = _closed_loop(rng, callers=4, rounds=8, expect_ms=20)
    window_alone, _ = _closed_loop(rng, callers=4, rounds=8, expect_ms=0)
    full = sum(n for size, n in with_expect.items() if size == 4)
    assert full >= 5, with_expect  # after the first rounds, every batch carries all 4 callers
    assert sum(with_expect.values()) < sum(window_alone.values()), (with_expect, window_alone)


def test_a_lone_caller_is_not_held_back_by_the_expectation(rng):
    _, with_expect = _closed_loop(rng, callers=1, rounds=6, expect_ms=200)
    assert with_expect < 0.1  # one 20 ms call, not the 200 ms expectation window
