"""SPO's epoch: step pools sampled, every candidate judged through the reward fabric, pairs formed.

For each shard, `engine.sample_pool_shards` runs the pooled chain (`sampler.step_pool`); each step's
K x M candidates (their predicted clean images, the step in each item's metadata: `step`,
`num_steps`, `timestep`) go to `rewards.score` as one batch, like any rollout: in process, or as
`reward.proto` jobs over the Redis queue to `spie-reward serve` replicas. Any registered scorer
judges this way; a step-aware one reads the metadata.

SPO continues each chain from a uniformly drawn candidate, whatever the judge says, so the judging
need not stop the chain: with `sample.pipeline: async` each step's candidates go to a `Judge` thread
as soon as they are decoded, and the chain goes on while the servers score; the steps decoded while
a call is in flight go together in the next call (one round trip for all of them: as many inputs in
flight as the judge lets pile up); the pairs are formed once the scores are in. With `sync` each step
waits for its scores. Both give the same pairs (each candidate is scored on its own).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np

from sampler.rollout import Rollout
from trainer.algo.spo import judge_values, pair_batch
from trainer.config import Config
from trainer.rewards.scores import Scores


class Judge:
    """A daemon thread that scores the candidates the chains hand it: everything that waits when it
    is free goes in one `rewards.score` call (one round trip), and each step gets its own scores."""

    def __init__(self, rewards) -> None:
        self.rewards = rewards
        self.calls, self.seconds = 0, 0.0
        self._cond = threading.Condition()
        self._waiting: list[tuple[Rollout, Future]] = []
        self._closed = False
        threading.Thread(target=self._run, name="spie-spo-judge", daemon=True).start()

    def submit(self, candidates: Rollout) -> Future:
        """Queue one step's candidates; the future's result is their `Scores`."""
        future: Future = Future()
        with self._cond:
            self._waiting.append((candidates, future))
            self._cond.notify()
        return future

    def close(self) -> None:
        """Stop after the call in progress; what still waits is cancelled."""
        with self._cond:
            self._closed = True
            for _, future in self._waiting:
                future.cancel()
            self._waiting = []
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                jobs, self._waiting = self._waiting, []
            steps = [c for c, _ in jobs]
            t = time.perf_counter()
            try:
                scores = self.rewards.score(Rollout.concat(steps) if len(steps) > 1 else steps[0])
            except BaseException as err:  # re-raised in the loop by `future.result()`
                for _, future in jobs:
                    future.set_exception(err)
                continue
            self.seconds += time.perf_counter() - t
            self.calls += 1
            start = 0
            for candidates, future in jobs:
                future.set_result(scores.select(list(range(start, start + len(candidates)))))
                start += len(candidates)


def sample_spo(
    engine, rewards, shards: list, config: Config, progress: bool
) -> tuple[Rollout, Scores, Rollout, dict[str, float]]:
    """Sample `shards` with SPO's pools, judge every candidate and form the step-wise pairs.

    Args:
        engine: has `sample_pool_shards(shards, on_step, progress)`, yielding each shard's pools
            in order (`LocalEngine`; `RayEngine` samples them on its rollout workers at once).
        rewards: `score(rollout) -> Scores` (in process or over the queue); with `sample.pipeline:
            async` it is called from a `Judge` thread while the chains go on.

    Returns:
        The final edits (one chain per input), their scores (for the epoch's metrics), the training
        batch of pairs (`trainer.algo.spo.pair_batch`, concatenated over steps and shards) and the
        epoch's numbers: `spo.pools`, `spo.pairs`, `spo.judged`, `spo.judge_failed`,
        `spo.judge_mean`, `spo.gap_mean` (best minus worst judge value), `spo.judge_calls`, the timings.
    """
    o = config.train.spo
    judge = Judge(rewards) if config.sample.pipeline == "async" else None
    jobs: list[tuple[Rollout, Future | Scores]] = []
    calls, judging = 0, 0.0

    def on_step(candidates: Rollout) -> None:
        nonlocal calls, judging
        if judge is not None:
            jobs.append((candidates, judge.submit(candidates)))
            return
        t = time.perf_counter()
        jobs.append((candidates, rewards.score(candidates)))
        calls, judging = calls + 1, judging + time.perf_counter() - t

    t0 = time.perf_counter()
    try:
        finals = [pool.final for pool in engine.sample_pool_shards(shards, on_step, progress)]
        t1 = time.perf_counter()
        wait = 2.5 * config.reward.deadline_s
        pairs, values, gaps = [], [], []
        for candidates, job in jobs:
            if isinstance(job, Future):
                try:
                    job = job.result(timeout=wait)
                except FutureTimeout as err:
                    raise RuntimeError(
                        f"SPO: the judge gave no scores for {candidates.item_ids[0]}.. within {wait:g}s "
                        f"(2.5 x reward.deadline_s); not training on a partial batch"
                    ) from err
            pairs.append(_pairs(config, candidates, job, values, gaps))
    finally:
        if judge is not None:
            judge.close()
            calls, judging = judge.calls, judge.seconds
    t2 = time.perf_counter()
    final = Rollout.concat(finals) if len(finals) > 1 else finals[0]
    scores = rewards.score(final)
    t3 = time.perf_counter()
    batch = Rollout.concat(pairs) if pairs else final.select([])
    all_values = np.concatenate(values) if values else np.zeros(0)
    gap = np.concatenate(gaps) if gaps else np.zeros(0)
    finite = all_values[np.isfinite(all_values)]
    info = {
        "spo.pools": float(len(all_values) // o.pool_size),
        "spo.pairs": float(len(batch) // 2),
        "spo.judged": float(len(all_values)),
        "spo.judge_failed": float(np.isnan(all_values).sum()),
        "spo.judge_mean": float(finite.mean()) if finite.size else float("nan"),
        "spo.gap_mean": float(np.nanmean(gap)) if np.isfinite(gap).any() else float("nan"),
        "time_sampling_s": t1 - t0,
        "time_judging_s": judging,
        "time_judging_wait_s": t2 - t1,
        "time_scoring_s": t3 - t2,
        "time_sample_score_s": t3 - t0,
        "spo.judge_calls": float(calls),
    }
    return final, scores, batch, info


def _pairs(config: Config, candidates: Rollout, scores: Scores, values: list, gaps: list) -> Rollout:
    """One step's pairs; appends the candidates' judge values and their pools' best - worst gaps."""
    o = config.train.spo
    v = judge_values(config.reward, scores)
    pool = v.view(-1, o.pool_size)
    gaps.append((pool.max(dim=1).values - pool.min(dim=1).values).numpy())
    values.append(v.numpy())
    return pair_batch(candidates, v, o.threshold, o.pool_size)
