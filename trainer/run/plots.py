"""Pictures of a run and of an evaluation: `reward_curve.png` and `before_after.png`.

matplotlib runs on its Agg backend (files only, no display), selected per figure through
`matplotlib.figure.Figure` so that importing this module changes no global state.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from trainer.errors import UserError


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"metrics file not found: {path}")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{n}: not valid JSON ({err.msg})") from err
        if isinstance(record, dict):
            records.append(record)
    if not records:
        raise UserError(f"{path}: no metric records")
    return records


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of the records that have a finite number under `key`."""
    pts = [
        (r.get("epoch", i), r[key])
        for i, r in enumerate(records)
        if isinstance(r.get(key), int | float) and math.isfinite(r[key])
    ]
    if not pts:
        return np.zeros(0), np.zeros(0)
    x, y = zip(*pts, strict=True)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def _probe_series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(policy versions, values) of a probe key: `probe.*` of epoch e was measured after e's update
    (version e + 1); `initial_probe.*` before any update (version 0)."""
    x, y = _series(records, key)
    x0, y0 = _series(records, "initial_" + key)
    return np.concatenate([np.zeros(min(1, y0.size)), x + 1]), np.concatenate([y0[:1], y])


def reward_curve(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Plot each scorer's `<name>.mean` per epoch, with a +-1 std band where `<name>.std` is logged
    and the other `<name>.<key>` numbers on the same scale (e.g. `oracle_edit.success`) as dashed
    lines, and, where the run measured it (`eval.probe_every`), the held-out probe set's scores under
    fixed noise in black; one panel per scorer. Returns the PNG path."""
    path, out = Path(metrics_jsonl), Path(out_png)
    records = _read_jsonl(path)
    keys = sorted({k for r in records for k in r})
    probe_keys = ("probe.", "initial_probe.")
    names = [k[: -len(".mean")] for k in keys if k.endswith(".mean") and not k.startswith(probe_keys)]
    if not names:
        raise UserError(f"{path}: no '<scorer>.mean' keys to plot")
    fig = _figure(4.2 * len(names), 3.2)
    for col, name in enumerate(names, start=1):
        ax = fig.add_subplot(1, len(names), col)
        x, mean = _series(records, f"{name}.mean")
        ax.plot(x, mean, marker="o", markersize=3, label=f"{name} mean")
        xs, std = _series(records, f"{name}.std")
        if std.size == mean.size and std.size and np.array_equal(xs, x):
            ax.fill_between(x, mean - std, mean + std, alpha=0.2, label="± std")
        shown = [mean]
        lo, hi = float(np.nanmin(mean)), float(np.nanmax(mean))
        for extra in keys:
            if extra.startswith(f"{name}.") and extra not in (f"{name}.mean", f"{name}.std"):
                ex, ey = _series(records, extra)
                # Details on the mean's scale only (e.g. a success rate next to a [0, 1] score; a
                # colour error in RGB units would flatten it), and none that repeats a drawn line.
                same_scale = (
                    ey.size and min(lo, 0.0) - 1e-9 <= np.nanmin(ey) and np.nanmax(ey) <= max(hi, 1.0)
                )
                repeat = any(y.shape == ey.shape and np.allclose(y, ey, equal_nan=True) for y in shown)
                if same_scale and not repeat:
                    ax.plot(ex, ey, linestyle="--", marker=".", label=extra)
                    shown.append(ey)
        # The probe's mean and success rate (its other details would repeat the lines above or
        # sit on another scale).
        for key in (k for k in keys if k.startswith(f"probe.{name}.") and k.endswith((".mean", ".success"))):
            px, py = _probe_series(records, key)
            if py.size:
                style = "-" if key.endswith(".mean") else ":"
                label = f"held-out probe, fixed noise ({key[len('probe.') :]})"
                ax.plot(px, py, linestyle=style, marker="s", markersize=4, color="black", label=label)
        ax.set_title(name)
        probed = any(k.startswith(f"probe.{name}.") for k in keys)
        ax.set_xlabel("epoch (probe: after that many epochs' updates)" if probed else "epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def before_after(
    out_png: str | Path,
    columns: Sequence[tuple[str, torch.Tensor]],
    row_titles: Sequence[str] = (),
    max_rows: int = 8,
    title: str = "",
) -> Path:
    """A grid of images, one row per input, one titled column per kind (source, each model's edit,
    the target).

    Args:
        out_png: where to write the PNG.
        columns: (title, (K, 3, R, R) images in [0, 1]) per column, all with the same K.
        row_titles: K short strings shown left of each row (e.g. the instruction).
        max_rows: at most this many rows.
        title: a line above the grid (e.g. how many edits a model fixed and broke).
    """
    out = Path(out_png)
    rows = min(max_rows, *(int(images.shape[0]) for _, images in columns))
    fig = _figure(1.9 * len(columns) + 0.4, 1.9 * rows + 0.3)
    for r in range(rows):
        for c, (heading, images) in enumerate(columns):
            ax = fig.add_subplot(rows, len(columns), r * len(columns) + c + 1)
            arr = images[r].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
            ax.imshow(arr, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(heading, fontsize=9)
            if c == 0 and r < len(row_titles):
                ax.set_ylabel(_wrap(row_titles[r]), fontsize=7)
    if title:
        fig.suptitle(_wrap(title, 28 * len(columns)), fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


def _wrap(text: str, width: int = 22) -> str:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    lines.append(line)
    return "\n".join(lines[:3])
