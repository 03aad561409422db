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


def _legend_below(ax) -> None:
    """The legend under the axes, never over the lines."""
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=1, frameon=False)


def reward_curve(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Plot a run's scores per epoch, one column per scorer.

    Where the run measured it (`eval.probe_every`), the top row is the held-out probe set under fixed
    noise (the number that moves only when the policy does): `probe.<name>.mean` and
    `probe.<name>.success`, each with a band: the 95 % interval of its change since the first probe,
    paired over the same inputs and noise (`probe_ci.<key>`, `trainer.guard.check.probe_record`). The row below (the only one without a probe) has the
    training batches' `<name>.mean` with a +-1 std band and `<name>.success`, lighter: they move with
    each epoch's inputs. Other details (e.g. `oracle_edit.gain`, defined on brighten edits only)
    are left out: a mean over the items a detail applies to is not comparable with the others. The
    legends sit under their axes. Returns the PNG path."""
    path, out = Path(metrics_jsonl), Path(out_png)
    records = _read_jsonl(path)
    keys = sorted({k for r in records for k in r})
    probe_keys = ("probe.", "initial_probe.", "probe_ci.", "initial_probe_ci.")
    names = [k[: -len(".mean")] for k in keys if k.endswith(".mean") and not k.startswith(probe_keys)]
    if not names:
        raise UserError(f"{path}: no '<scorer>.mean' keys to plot")
    probed = [n for n in names if f"probe.{n}.mean" in keys]
    rows = 2 if probed else 1
    fig = _figure(4.2 * len(names), 3.9 * rows)
    for col, name in enumerate(names):
        if name in probed:
            ax = fig.add_subplot(rows, len(names), col + 1)
            for suffix, style in ((".mean", "-"), (".success", ":")):
                key = f"probe.{name}{suffix}"
                px, py = _probe_series(records, key)
                if not py.size:
                    continue
                label = f"{name}{suffix}"
                ax.plot(px, py, linestyle=style, marker="s", markersize=4, color="black", label=label)
                cx, half = _probe_series(records, f"probe_ci.{name}{suffix}")
                if half.size == py.size and np.array_equal(cx, px):
                    ax.fill_between(
                        px,
                        py - half,
                        py + half,
                        color="black",
                        alpha=0.12,
                        label=f"{label}: 95 % CI of the change since epoch 0",
                    )
            n_items = next((r["probe_items"] for r in records if "probe_items" in r), None)
            size = f"{int(n_items)} " if n_items else ""
            ax.set_title(f"{name}: held-out probe ({size}inputs, fixed noise)", fontsize=9)
            ax.set_xlabel("policy after this many epochs")
            ax.grid(alpha=0.3)
            _legend_below(ax)
        ax = fig.add_subplot(rows, len(names), (rows - 1) * len(names) + col + 1)
        x, mean = _series(records, f"{name}.mean")
        light = 0.55 if probed else 1.0
        ax.plot(x, mean, marker="o", markersize=3, alpha=light, label=f"{name}.mean")
        xs, std = _series(records, f"{name}.std")
        if std.size == mean.size and std.size and np.array_equal(xs, x):
            ax.fill_between(x, mean - std, mean + std, alpha=0.15, label="± std")
        ex, ey = _series(records, f"{name}.success")
        if ey.size:
            ax.plot(ex, ey, linestyle="--", marker=".", alpha=light, label=f"{name}.success")
        ax.set_title(f"{name}: training batches (each epoch's inputs)", fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        _legend_below(ax)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
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
