"""Timing shared by the sampler benchmarks (`bench/sampler_overhead.py`, `bench/flow_sampler.py`):
our rollout against a diffusers pipeline, interleaved in this process."""

from __future__ import annotations

import time
from collections.abc import Callable

from bench.paired import paired_times, ratios, spread


def time_against_pipeline(
    policy, sources, prompts: list[str], pipeline: Callable[[], object], runs: int, device: str
) -> tuple[list[float], list[float], list[float]]:
    """Seconds of `policy.rollout(sources, prompts)` (generator seeded 0) and of `pipeline()` (under
    no_grad), and their ratios, over `runs` pairs after two warm-up calls each; the order alternates
    between pairs so drift on a noisy machine hits both sides alike. CUDA is synchronised before and
    after each call. Returns (t_ours, t_theirs, ratios)."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn: Callable[[], object]) -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    def ours() -> float:
        return timed(lambda: policy.rollout(sources, prompts, generator=torch.Generator().manual_seed(0)))

    def theirs() -> float:
        with torch.no_grad():
            return timed(pipeline)

    # two warm-up calls of each (alternating), then pairs in alternating order
    t_ours, t_theirs = paired_times(ours, theirs, runs, warmup=2)
    return t_ours, t_theirs, ratios(t_ours, t_theirs)


def ratio_line(values: list[float]) -> str:
    """The benchmarks' last line: the median ratio against the 1.10 target, and every run's."""
    return f"ratio ours/pipeline (paired): {spread(values)} (target <= 1.10)  runs {[round(r, 3) for r in values]}"
