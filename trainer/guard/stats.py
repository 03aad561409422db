"""Image statistics that move when a policy games its reward instead of editing better.

Each is a mean over a batch of edits. What they catch, from reported failures: backgrounds wiped to
black or white (an OCR reward, dark pixels 0.45 -> 0.93: `dark_fraction`, `bright_fraction`,
`brightness`), over-saturated colour (`saturation`), high-frequency noise and periodic grid or
checkerboard artefacts (Flow-GRPO issues 204 and 233 on Qwen-Image: `high_frequency`, `grid`), and
the norm of the final latents drifting (DiffusionNFT runs: `x0_norm`).
"""

from __future__ import annotations

import torch

_LUMA = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)


def _spectrum(luma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, H, W) luminance -> its power spectrum without the mean (N, H, W) and the frequencies of
    each bin in cycles per pixel along y and x ((H, 1), (1, W), in [-0.5, 0.5))."""
    n, h, w = luma.shape
    power = torch.fft.fft2(luma - luma.mean(dim=(1, 2), keepdim=True)).abs() ** 2
    fy = torch.fft.fftfreq(h, dtype=torch.float64).view(h, 1)
    fx = torch.fft.fftfreq(w, dtype=torch.float64).view(1, w)
    return power, fy, fx


def image_stats(images: torch.Tensor, x0: torch.Tensor | None = None) -> dict[str, float]:
    """Statistics of a batch of edits.

    Args:
        images: (N, 3, H, W) in [0, 1].
        x0: (N, C, h, w) final latents, or None.

    Returns:
        brightness: mean luminance (Rec. 601 weights);
        saturation: mean HSV saturation, (max - min) / max over the channels;
        dark_fraction / bright_fraction: share of pixels with luminance < 0.1 / > 0.9;
        high_frequency: share of the luminance energy (mean removed) at radial frequencies above
            0.25 cycles per pixel, averaged over the images;
        grid: share of the luminance energy on the frequency lines of period 2 and 4 pixels
            (|f_x| or |f_y| in {0.25, 0.5}), where a grid or checkerboard puts its energy;
        x0_norm: RMS of the final latents (with `x0`).
    """
    x = images.detach().double().clamp(0, 1)
    luma = torch.einsum("c,nchw->nhw", _LUMA, x)
    cmax, cmin = x.max(dim=1).values, x.min(dim=1).values
    power, fy, fx = _spectrum(luma)
    total = power.flatten(1).sum(1).clamp_min(1e-12)
    radial = (fy**2 + fx**2).sqrt()
    high = (power * (radial > 0.25)).flatten(1).sum(1) / total
    on_line = (
        torch.isclose(fy.abs(), torch.tensor(0.5, dtype=torch.float64))
        | torch.isclose(fy.abs(), torch.tensor(0.25, dtype=torch.float64))
        | torch.isclose(fx.abs(), torch.tensor(0.5, dtype=torch.float64))
        | torch.isclose(fx.abs(), torch.tensor(0.25, dtype=torch.float64))
    )
    grid = (power * on_line).flatten(1).sum(1) / total
    out = {
        "brightness": float(luma.mean()),
        "saturation": float(((cmax - cmin) / cmax.clamp_min(1e-6)).mean()),
        "dark_fraction": float((luma < 0.1).double().mean()),
        "bright_fraction": float((luma > 0.9).double().mean()),
        "high_frequency": float(high.mean()),
        "grid": float(grid.mean()),
    }
    if x0 is not None:
        out["x0_norm"] = float(x0.detach().double().pow(2).mean().sqrt())
    return out
