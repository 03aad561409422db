"""Timing shared by the sampler benchmarks (`bench/sampler_overhead.py`, `bench/flow_sampler.py`):
our rollout against a diffusers pipeline, interleaved in this process."""

from __future__ import annotations

import time
from collections.abc import Callable


def time_interleaved(
    ours: Callable[[], object], theirs: Callable[[], object], runs: int, device: str
) -> tuple[list[float], list[float], list[float]]:
    """Seconds of `ours()` and `theirs()` and their ratios over `runs` pairs, after one warm-up call
    each; the order alternates between pairs so drift on a noisy machine hits both sides alike. CUDA
    is synchronised before and after each call. Returns (t_ours, t_theirs, ratios)."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(fn: Callable[[], object]) -> Callable[[], float]:
        def run() -> float:
            sync()
            t = time.perf_counter()
            fn()
            sync()
            return time.perf_counter() - t

        return run

    time_ours, time_theirs = timed(ours), timed(theirs)
    time_ours(), time_theirs()  # warm-up
    ratios, t_ours, t_theirs = [], [], []
    for i in range(runs):
        a, b = (time_ours(), time_theirs()) if i % 2 == 0 else tuple(reversed((time_theirs(), time_ours())))
        t_ours.append(a)
        t_theirs.append(b)
        ratios.append(a / b)
    return t_ours, t_theirs, ratios
