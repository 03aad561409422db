"""One epoch's sampling and scoring, one after the other or overlapped (`sample.pipeline`).

- `sync`: sample every shard of the epoch, then score the whole batch (the original order).
- `async`: sample the shards wave by wave (one shard per rollout worker: 1 in this process,
  `ray.num_rollout_workers` with Ray) and hand each wave's rollout to a scoring thread as soon as it
  exists, so the scorers (reward servers over the queue, or in-process models) work on wave k while
  wave k+1 is sampled. The scores are gathered in shard order and concatenated.

Both give the same rollout and the same scores: each shard carries the state of the epoch's random
stream where its noise starts (`trainer.loop.plan_epoch`), and the scorers score each edit on its
own. Training then proceeds on the whole gathered batch exactly as before; the pipeline never trains
on weights newer than those that sampled (staleness stays 0).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import numpy as np

from sampler.rollout import Rollout
from trainer.config import Config
from trainer.rewards.scores import Scores


class ScoringThread:
    """One daemon thread that runs `rewards.score(rollout)` calls in submission order.

    A daemon, not a `ThreadPoolExecutor` worker: if the run stops while a call is stuck (a reward
    server that never answers), the process can still exit; the call's own deadline ends it anyway.
    """

    def __init__(self, rewards) -> None:
        self.rewards = rewards
        self.jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="spie-scoring", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            future, rollout = job
            if not future.set_running_or_notify_cancel():
                continue
            t0 = time.perf_counter()
            try:
                scores = self.rewards.score(rollout)
            except BaseException as err:  # re-raised in the loop by `future.result()`
                future.set_exception(err)
            else:
                future.set_result((scores, time.perf_counter() - t0))

    def submit(self, rollout: Rollout) -> Future:
        """Queue `rollout` for scoring; the future's result is (Scores, seconds spent scoring)."""
        future: Future = Future()
        self.jobs.put((future, rollout))
        return future

    def close(self) -> None:
        """Stop after the call in progress (queued calls are dropped); does not wait for it."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        self.jobs.put(None)


def merge_scores(parts: list[Scores]) -> Scores:
    """Concatenate the scores of consecutive sub-batches along the item axis.

    Every field of `Scores` is merged the same way: a mapping per key (arrays concatenated, lists
    joined; a key that some part lacks, such as a detail only some items have, is NaN / None
    there), a list joined, None kept.
    """
    sizes = [len(next(iter(p.values.values()))) for p in parts]

    def missing(like: Any, n: int) -> Any:
        return np.full(n, np.nan) if isinstance(like, np.ndarray) else [None] * n

    def join(values: list[Any]) -> Any:
        if values[0] is None:
            return None
        if isinstance(values[0], dict):
            keys = list(dict.fromkeys(k for v in values for k in v))
            out = {}
            for k in keys:
                like = next(v[k] for v in values if k in v)
                out[k] = join(
                    [v[k] if k in v else missing(like, n) for v, n in zip(values, sizes, strict=True)]
                )
            return out
        if isinstance(values[0], np.ndarray):
            return np.concatenate(values)
        return [x for v in values for x in v]

    return Scores(**{f.name: join([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Scores)})


def score_wait_s(config: Config) -> float:
    """The longest the loop waits for one wave's scores: 2.5 x reward.deadline_s. The queue client
    gives up after 2 x reward.deadline_s (its deadline and one resubmission) with an error naming the
    scorer and the items; the extra half lets that error arrive first."""
    return 2.5 * config.reward.deadline_s


def wave_size(config: Config) -> int:
    """Shards sampled at once: one per rollout worker."""
    return config.ray.num_rollout_workers if config.ray.enabled else 1


def probe(engine, rewards, shards: list) -> dict[str, float]:
    """Sample the fixed probe `shards` under the engine's current weights and score them:
    `probe.<scorer>.mean` and `probe.<scorer>.<detail>` (means over the probe set)."""
    scores = rewards.score(engine.sample(shards, False))
    out = {}
    for name, values in {**{f"{k}.mean": v for k, v in scores.values.items()}, **scores.details}.items():
        finite = values[np.isfinite(values)]
        if finite.size:
            out[f"probe.{name}"] = float(finite.mean())
    return out


def sample_and_score(
    engine, rewards, shards: list, config: Config, progress: bool, scorer: ScoringThread | None
) -> tuple[Rollout, Scores, dict[str, float]]:
    """Sample `shards` with `engine` and score them with `rewards`; overlapped when `scorer` is given.

    Returns the rollout of all shards in shard order, its scores, and the phase timings for the
    metrics: `time_sampling_s` (time spent sampling, summed over the waves), `time_scoring_s` (time
    spent in `rewards.score`, summed), `time_sample_score_s` (wall time from the first rollout to the
    last score), `time_scoring_wait_s` (wall time waiting for scores after the last rollout) and
    `time_overlap_s` (sampling + scoring - wall: the time the two phases ran at once).
    """
    t0 = time.perf_counter()
    if scorer is None:
        rollout = engine.sample(shards, progress)
        t1 = time.perf_counter()
        scores = rewards.score(rollout)
        t2 = time.perf_counter()
        return rollout, scores, _times(t1 - t0, t2 - t1, t2 - t0, t2 - t1, overlap=0.0)
    n = wave_size(config)
    parts: list[Rollout] = []
    futures: list[Future] = []
    sampling = 0.0
    try:
        for start in range(0, len(shards), n):
            ts = time.perf_counter()
            part = engine.sample(shards[start : start + n], progress)
            sampling += time.perf_counter() - ts
            parts.append(part)
            futures.append(scorer.submit(part))
            _raise_early(futures)
        t1 = time.perf_counter()
        results = [_result(f, i * n, len(shards), n, config) for i, f in enumerate(futures)]
    except BaseException:
        for f in futures:
            f.cancel()
        raise
    t2 = time.perf_counter()
    scoring = sum(seconds for _, seconds in results)
    rollout = Rollout.concat(parts) if len(parts) > 1 else parts[0]
    scores = merge_scores([s for s, _ in results]) if len(results) > 1 else results[0][0]
    overlap = max(0.0, sampling + scoring - (t2 - t0))
    return rollout, scores, _times(sampling, scoring, t2 - t0, t2 - t1, overlap)


def _times(sampling: float, scoring: float, wall: float, wait: float, overlap: float) -> dict[str, float]:
    return {
        "time_sampling_s": sampling,
        "time_scoring_s": scoring,
        "time_sample_score_s": wall,
        "time_scoring_wait_s": wait,
        "time_overlap_s": overlap,
    }


def _raise_early(futures: list[Future]) -> None:
    """Stop the epoch as soon as a finished scoring call failed (the error it raised, as in sync)."""
    for f in futures:
        if f.done() and not f.cancelled() and f.exception() is not None:
            f.result()


def _result(future: Future, first: int, total: int, n: int, config: Config) -> tuple[Scores, float]:
    wait = score_wait_s(config)
    try:
        return future.result(timeout=wait)
    except FutureTimeout as err:
        last = min(first + n, total) - 1
        raise RuntimeError(
            f"scoring of sampling batches {first}..{last} gave no result within {wait:g}s "
            f"(2.5 x reward.deadline_s={config.reward.deadline_s:g}); not training on a partial batch"
        ) from err
