"""Timing shared by the sampler benchmarks (`bench/sampler_overhead.py`, `bench/flow_sampler.py`):
our rollout against a diffusers pipeline, interleaved in this process."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_against_pipeline(
    policy, sources, prompts: list[str], pipeline: Callable[[], object], runs: int, device: str
) -> tuple[list[float], list[float], list[float]]:
    """Seconds of `policy.rollout(sources, prompts)` (generator seeded 0) and of `pipeline()` (under
    no_grad), and their ratios, over `runs` pairs after one warm-up call each; the order alternates
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

    ours(), theirs()  # warm-up
    ratios, t_ours, t_theirs = [], [], []
    for i in range(runs):
        a, b = (ours(), theirs()) if i % 2 == 0 else tuple(reversed((theirs(), ours())))
        t_ours.append(a)
        t_theirs.append(b)
        ratios.append(a / b)
    return t_ours, t_theirs, ratios


def ratio_line(ratios: list[float]) -> str:
    """The benchmarks' last line: the median ratio against the 1.10 target, and every run's."""
    return f"ratio ours/pipeline: median {statistics.median(ratios):.3f} (target <= 1.10)  runs {[round(r, 3) for r in ratios]}"
