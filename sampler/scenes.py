"""Seeded synthetic scenes: plain backgrounds with coloured rectangles and discs.

They need no files, so the tiny model's VAE warm-up, the tests and the CPU presets all use them.
"""

from __future__ import annotations

import numpy as np


def shapes_scene(rng: np.random.Generator, resolution: int) -> np.ndarray:
    """One seeded scene: (R, R, 3) uint8, a background and 1-3 coloured rectangles or discs."""
    img = np.empty((resolution, resolution, 3), dtype=np.uint8)
    img[:] = rng.integers(30, 225, size=3)
    yy, xx = np.mgrid[:resolution, :resolution]
    for _ in range(int(rng.integers(1, 4))):
        colour = rng.integers(0, 256, size=3)
        cy, cx = rng.integers(resolution // 6, resolution - resolution // 6, size=2)
        r = int(rng.integers(resolution // 8, resolution // 3))
        shape = (
            (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            if rng.random() < 0.5
            else (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
        )
        img[shape] = colour
    return img


def shapes_batch(seed: int, count: int, resolution: int) -> np.ndarray:
    """(count, R, R, 3) uint8 scenes drawn from one seeded stream."""
    rng = np.random.default_rng(seed)
    return np.stack([shapes_scene(rng, resolution) for _ in range(count)])
