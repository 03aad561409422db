"""What every benchmark shares: paired, interleaved timing and the machine's load.

A benchmark that compares A with B times them in pairs, alternating which goes first (A B, B A, A B,
...), after warming up each side (also alternating), so that drift on a shared machine hits both
sides alike; it reports the median of the per-pair ratios with their spread (min-max and the
interquartile range) and the load average it ran under (`load_line`, printed at its start and end).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable


def load_line(label: str = "load") -> str:
    """`load average 0.41 / 0.99 / 1.16 (1/5/15 min) on 2 cores, 2026-12-07 05:57:36 UTC`."""
    one, five, fifteen = os.getloadavg()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return f"[{label}] load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cores, {stamp}"


def paired_times(
    a: Callable[[], float], b: Callable[[], float], pairs: int, warmup: int = 2
) -> tuple[list[float], list[float]]:
    """Times of `a()` and `b()` over `pairs` interleaved pairs, after `warmup` calls of each.

    Each callable runs one measurement and returns its figure (seconds, or any per-run value); pair i
    runs a first when i is even and b first when odd. Returns (a's figures, b's figures), pair by pair.
    """
    for i in range(warmup):
        (a(), b()) if i % 2 == 0 else (b(), a())
    out_a, out_b = [], []
    for i in range(pairs):
        if i % 2 == 0:
            x = a()
            y = b()
        else:
            y = b()
            x = a()
        out_a.append(x)
        out_b.append(y)
    return out_a, out_b


def timer(fn: Callable[[], object]) -> Callable[[], float]:
    """`fn` as a callable returning its wall time in seconds."""

    def run() -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    return run


def spread(values: list[float], digits: int = 3) -> str:
    """`median 1.025 (range 0.990-1.070, IQR 1.010-1.040, n 7)`."""
    v = sorted(values)
    if len(v) >= 4:
        q1, _, q3 = statistics.quantiles(v, n=4)
        iqr = f", IQR {q1:.{digits}f}-{q3:.{digits}f}"
    else:
        iqr = ""
    return f"median {statistics.median(v):.{digits}f} (range {v[0]:.{digits}f}-{v[-1]:.{digits}f}{iqr}, n {len(v)})"


def ratios(num: list[float], den: list[float]) -> list[float]:
    """Per-pair ratios num[i] / den[i]."""
    return [x / y for x, y in zip(num, den, strict=True)]
