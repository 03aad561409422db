"""`spie evaluate --benchmark gedit-bench-en|imgedit`: edit every item of a benchmark with one or two
models (the same per-item noise), judge with the benchmark's protocol (`bench_judge`), and write the
table in the papers' layout, the paired differences with bootstrap intervals, and the judge's pin.

The headline is the papers' aggregate: the mean over task types of each type's mean (GEdit-Bench's
per-type averages and their average; ImgEdit's type columns and its Overall). Its paired difference
is bootstrapped over items with each item's difference weighted by M / (T n_type), so that the
mean of the weighted differences is exactly the mean over the T types.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.config import Config
from trainer.engine.models import load_policy, model_spec
from trainer.engine.shards import item_seed as noise_seed
from trainer.errors import UserError
from trainer.evaluate.bench_judge import judge_items, judge_spread, make_judge, pin
from trainer.evaluate.benchmarks import (
    GEDIT_TASKS,
    IMGEDIT_COLUMNS,
    IMGEDIT_TYPES,
    PUBLISHED,
    read_gedit,
    read_imgedit,
)
from trainer.evaluate.compare import resolve_config, sample_edits
from trainer.evaluate.metrics import paired_difference


def _tensor(image, r: int) -> torch.Tensor:
    """A PIL image resized to (3, r, r) in [0, 1] (the editors here work on square images)."""
    from PIL import Image

    arr = np.asarray(image.resize((r, r), Image.Resampling.LANCZOS), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _by_type(values: np.ndarray, types: list[str], order: Sequence[str]) -> dict[str, float]:
    out = {}
    for t in order:
        sel = np.array([x == t for x in types]) & np.isfinite(values)
        if sel.any():
            out[t] = float(values[sel].mean())
    out["overall"] = float(np.mean(list(out.values()))) if out else float("nan")
    return out


def _weighted(d: np.ndarray, types: list[str]) -> np.ndarray:
    counts = {t: types.count(t) for t in set(types)}
    return np.array([x * len(types) / (len(counts) * counts[t]) for x, t in zip(d, types, strict=True)])


def run_benchmark(
    benchmark: str,
    folder: str | Path,
    models: Sequence[str],
    judge_model: str,
    config: Config | str | Path | None = None,
    out_dir: str | Path = "eval/benchmark",
    *,
    overrides: Sequence[str] = (),
    labels: Sequence[str] | None = None,
    num_items: int | None = None,
    seed: int = 0,
    judge_revision: str = "",
    judge_repeats: int = 0,
    judge_kwargs: dict | None = None,
    resamples: int = 2000,
    confidence: float = 0.95,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """Run `benchmark` on the items under `folder`; writes `benchmark.json` and `benchmark.md` in
    `out_dir` and returns the summary ("table"[label][metric][type], "differences", "judge"...)."""
    if not 1 <= len(models) <= 2:
        raise UserError(f"give one or two models, got {len(models)}")
    labels = list(labels or ("A", "B")[: len(models)])
    out = Path(out_dir)
    imgedit = benchmark == "imgedit"
    items, rubrics = read_imgedit(folder) if imgedit else (read_gedit(folder), None)
    items = items[:num_items] if num_items else items
    if not items:
        raise UserError(f"{folder}: no {benchmark} items")
    cfg = resolve_config(models, config, overrides)
    r = cfg.model.resolution
    sources = torch.stack([_tensor(it.source, r) for it in items])
    instructions = [it.instruction for it in items]
    seeds = [noise_seed(seed, i) for i in range(len(items))]
    edits = {}
    for m, label in zip(models, labels, strict=True):
        policy = load_policy(model_spec(str(m), label, cfg))
        edits[label] = sample_edits(policy, sources, instructions, seeds, None, batch_size, progress)
        del policy
        gc.collect()
    judge = make_judge(benchmark, judge_model, out, **(judge_kwargs or {}))
    scores = {label: judge_items(benchmark, judge, sources, edits[label], items, rubrics) for label in labels}
    types, order = [it.task_type for it in items], IMGEDIT_TYPES if imgedit else GEDIT_TASKS
    metrics = ["score"] if imgedit else ["sc", "pq", "o"]
    table = {label: {m: _by_type(scores[label][m], types, order) for m in metrics} for label in labels}
    if not imgedit and any(it.intersection is not None for it in items):
        inter = [bool(it.intersection) for it in items]
        for label in labels:
            for m in metrics:
                sub = np.where(inter, scores[label][m], np.nan)
                table[label][m]["overall_intersection"] = _by_type(sub, types, order)["overall"]
    differences = {}
    if len(labels) == 2:
        a, b = scores[labels[0]], scores[labels[1]]
        for m in metrics:
            d = b[m] - a[m]
            per = {
                t: paired_difference(
                    a[m][[x == t for x in types]], b[m][[x == t for x in types]], resamples, confidence, seed
                )
                for t in order
                if t in types
            }
            per["overall"] = paired_difference(
                np.zeros_like(d), _weighted(d, types), resamples, confidence, seed
            )
            differences[m] = per
    spread = (
        judge_spread(
            benchmark,
            judge,
            sources,
            edits[labels[0]],
            items,
            rubrics,
            scores[labels[0]],
            min(judge_repeats, len(items)),
        )
        if judge_repeats
        else None
    )
    summary = {
        "benchmark": benchmark,
        "folder": str(folder),
        "num_items": len(items),
        "resolution": r,
        "models": [{"label": label, "spec": str(m)} for m, label in zip(models, labels, strict=True)],
        "judge": pin(benchmark, judge, judge_model, judge_revision, seed, rubrics),
        "judge_spread": spread,
        "aggregate": "mean over task types of each type's mean",
        "bootstrap": {"method": "percentile, paired", "resamples": resamples, "confidence": confidence},
        "table": table,
        "differences": differences,
        "items": [
            {"key": it.key, "task_type": it.task_type, "instruction": it.instruction, "noise_seed": s,
             "scores": {label: {m: float(v[i]) for m, v in scores[label].items()} for label in labels}}
            for i, (it, s) in enumerate(zip(items, seeds, strict=True))
        ],
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
    (out / "benchmark.md").write_text(format_benchmark(summary) + "\n")
    return summary


def format_benchmark(summary: dict[str, Any]) -> str:
    """Markdown tables in the papers' layout: a row per model, a column per task type and the
    aggregate; the paired differences B - A below; the judge's pin and spread."""
    imgedit = summary["benchmark"] == "imgedit"
    order = IMGEDIT_TYPES if imgedit else GEDIT_TASKS
    labels = [m["label"] for m in summary["models"]]
    first = summary["table"][labels[0]]
    present = [t for t in order if t in next(iter(first.values()))]
    names = {
        "score": "ImgEdit (1-5)",
        "sc": "GEdit-Bench-EN G_SC",
        "pq": "GEdit-Bench-EN G_PQ",
        "o": "GEdit-Bench-EN G_O",
    }
    lines = []
    for m in first:
        cols = [IMGEDIT_COLUMNS.get(t, t) for t in present] + ["Overall" if imgedit else "Avg"]
        lines += [
            f"**{names[m]}** ({summary['num_items']} items)",
            "",
            "| model | " + " | ".join(cols) + " |",
        ]
        lines.append("|---" * (len(cols) + 1) + "|")
        for label in labels:
            row = summary["table"][label][m]
            lines.append(f"| {label} | " + " | ".join(f"{row[t]:.2f}" for t in [*present, "overall"]) + " |")
        lines.append("")
        if m in summary["differences"]:
            d = summary["differences"][m]
            lines.append(
                f"paired {labels[1]} - {labels[0]} [{summary['bootstrap']['confidence']:.0%} CI]: "
                + "; ".join(
                    f"{'Overall' if t == 'overall' else IMGEDIT_COLUMNS.get(t, t)} {v['mean']:+.2f} [{v['ci_low']:+.2f}, {v['ci_high']:+.2f}]"
                    for t, v in d.items()
                )
            )
            lines.append("")
    j = summary["judge"]
    lines.append(
        f"judge: {j['model']} @ {j['revision']}, prompts {j['prompt_version']}, {j['decoding']}, seed {j['seed']}"
    )
    if summary["judge_spread"]:
        s = summary["judge_spread"]
        lines.append(
            f"judge spread ({s['items']} items re-judged alone): max |change| {s['max_abs_change']:.3f}, mean {s['mean_abs_change']:.3f}"
        )
    col = 1 if imgedit else 0
    lines.append("published (GPT judges): " + "; ".join(f"{k} {v[col]:.2f}" for k, v in PUBLISHED.items()))
    return "\n".join(lines)
