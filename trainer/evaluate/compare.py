"""`spie evaluate`: judge edits with SPIE's metrics and the configured reward scorers, with bootstrap
intervals, and compare two models on the same inputs and the same noise.

Two modes:
- precomputed edits (`evaluate_edits`): a JSONL file or folder of source, edit, instruction and
  optional mask, target and metadata (`trainer.evaluate.inputs`);
- models plus inputs (`evaluate_models`): one or two models, each an RL run folder or checkpoint
  folder (base model plus trained weights, as `spie generate` loads them), or a base model used as
  is (`tiny`, a diffusers model folder such as `models/toy-editor`, or a hub id); the inputs come
  from the config's `data` section or a JSONL/folder. Item i is generated from noise seeded by
  (seed, i) alone, whatever the batch it falls in, so both models see the same inputs and the same
  noise and their per-item difference is paired.

Outputs, next to each other: the JSON summary (config, per-model aggregates, the paired differences
B - A, per-item rows) and `before_after.png` (source | edit A | edit B | target, first K inputs).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sampler.policy import EditPolicy
from trainer.config import Config, DataConfig, load_config, to_dict, with_overrides
from trainer.engine.models import is_run_or_checkpoint, load_policy, model_spec
from trainer.engine.policy import (
    resolve_device,
)
from trainer.engine.shards import item_seed as noise_seed
from trainer.errors import UserError
from trainer.evaluate.inputs import EvalItems, items_from_config, read_edits
from trainer.evaluate.metrics import (
    BUILTIN_DIRECTION,
    ClipMetric,
    l2_outside_mask,
    paired_difference,
    score_with,
    summarize,
)
from trainer.evaluate.visible import unseen
from trainer.rewards.inprocess import build_scorers
from trainer.run.checkpoint import find_checkpoint
from trainer.run.plots import before_after

DEFAULT_LABELS = ("A", "B")


def resolve_config(
    models: Sequence[str], config: Config | str | Path | None = None, overrides: Sequence[str] = ()
) -> Config:
    """The evaluation config: `config` (a Config or a YAML preset), else the config of the first
    run/checkpoint among `models`, else the defaults; `overrides` on top. Its `sample` section sets
    the sampling of every model, its `data` section the inputs, its `reward` section the scorers."""
    if isinstance(config, Config):
        return with_overrides(config, overrides)
    if config is not None:
        return load_config(config, overrides)
    for spec in models:
        if is_run_or_checkpoint(Path(spec)):
            return load_config(find_checkpoint(spec) / "config.yaml", overrides)
    return load_config(None, overrides)


def input_overrides(inputs: str | Path | None, instruction: str | None, skip_bad: bool) -> list[str]:
    """`--set` items for `--inputs` (a JSONL file: data.source=jsonl; a folder: data.source=folder),
    `--instruction` (data.instructions) and `--skip-bad` (data.skip_bad, where the loader has it)."""
    out = []
    if inputs is not None:
        kind = "folder" if Path(inputs).is_dir() else "jsonl"
        out += [f"data.source={kind}", f"data.path={json.dumps(str(inputs))}"]
    if instruction:
        out.append(f"data.instructions={json.dumps([instruction])}")
    if skip_bad and "skip_bad" in {f.name for f in dataclasses.fields(DataConfig)}:
        out.append("data.skip_bad=true")
    return out


@torch.no_grad()
def sample_edits(
    policy: EditPolicy,
    sources: torch.Tensor,
    instructions: list[str],
    seeds: list[int],
    exemplars: torch.Tensor | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> torch.Tensor:
    """One edit per input, item i drawn from its own generator seeded with `seeds[i]`.

    This is the training sampler (`EditPolicy.rollout`) with one generator per item, so an item's
    edit does not depend on the batch it is in, and two models given the same seeds are paired.

    Args:
        sources: (M, 3, R, R) in [0, 1].
        instructions: M instructions.
        seeds: M noise seeds.
        exemplars: (M, 3, R, R) exemplar images (exemplar-conditioned models only).

    Returns:
        (M, 3, R, R) edits in [0, 1], on the CPU.
    """
    if policy.exemplar is not None and exemplars is None:
        raise UserError("this checkpoint uses exemplar conditioning: the inputs need exemplar images")
    out = []
    starts = range(0, len(instructions), batch_size)
    with policy.eval_mode():
        for start in tqdm(starts, desc="generating", leave=False, disable=not progress):
            sl = slice(start, start + batch_size)
            gens = [torch.Generator().manual_seed(s) for s in seeds[sl]]
            ex = exemplars[sl] if policy.exemplar is not None else None
            out.append(
                policy.rollout(sources[sl], instructions[sl], generator=gens, exemplars=ex).images.cpu()
            )
    return torch.cat(out)


# --------------------------------------------------------------------------- metrics and summary


def item_metrics(
    items: EvalItems, edited: torch.Tensor, scorers: dict, clip: ClipMetric | None
) -> tuple[dict[str, np.ndarray], list[dict[str, str]], list[dict[str, str]]]:
    """(metric name -> (M,) values, M dicts of scorer errors, M dicts of scorer texts) for M edits
    of `items`."""
    values: dict[str, np.ndarray] = {}
    if any(m is not None for m in items.masks):
        values["l2_outside_mask"] = l2_outside_mask(edited, items.sources, items.masks)
    if clip is not None:
        values.update(clip(edited, items.sources, items.instructions, items.metadata))
    scored, errors, texts = score_with(
        scorers, edited, items.sources, items.instructions, items.masks, items.metadata
    )
    values.update(scored)
    return values, errors, texts


def _clean(x: Any) -> Any:
    """JSON-safe: non-finite floats become null, numpy scalars plain numbers."""
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _finish(
    mode: str,
    config: Config,
    items: EvalItems,
    models: list[dict[str, Any]],
    edits: dict[str, torch.Tensor],
    scorers: dict,
    clip: ClipMetric | None,
    out_json: Path,
    seed: int,
    seeds: list[int] | None,
    resamples: int,
    confidence: float,
    grid_items: int,
    clip_model: str,
) -> dict[str, Any]:
    labels = list(edits)
    per_model, errors, texts = {}, {}, {}
    for label in labels:
        per_model[label], errors[label], texts[label] = item_metrics(items, edits[label], scorers, clip)
    names = list(per_model[labels[0]])
    info = {n: {"higher_is_better": BUILTIN_DIRECTION.get(n)} for n in names}
    for name, scorer in scorers.items():
        info[name] = {"higher_is_better": bool(scorer.higher_is_better)}
    metrics = {
        label: {n: summarize(per_model[label][n], resamples, confidence, seed) for n in names}
        for label in labels
    }
    differences, flips = {}, {}
    if len(labels) == 2:
        a, b = per_model[labels[0]], per_model[labels[1]]
        differences = {n: paired_difference(a[n], b[n], resamples, confidence, seed) for n in names}
        counts = {n: flip_counts(a[n], b[n]) for n in names}
        flips = {n: c for n, c in counts.items() if c is not None}
    rows = []
    for i in range(len(items)):
        row: dict[str, Any] = {"index": i, "name": items.names[i], "instruction": items.instructions[i]}
        if seeds is not None:
            row["noise_seed"] = seeds[i]
        if items.metadata[i]:
            row["metadata"] = items.metadata[i]
        row["metrics"] = {label: {n: float(per_model[label][n][i]) for n in names} for label in labels}
        errs = {label: errors[label][i] for label in labels if errors[label][i]}
        if errs:
            row["errors"] = errs
        said = {label: texts[label][i] for label in labels if texts[label][i]}
        if said:
            row["texts"] = said
        rows.append(row)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    grid = out_json.parent / "before_after.png"
    columns = [("source", items.sources)]
    columns += [
        (f"{m['label']}\n{m.get('short') or Path(m['spec']).name}", edits[m["label"]]) for m in models
    ]
    k = min(grid_items, len(items))
    if all(t is not None for t in items.targets):
        columns.append(("target", torch.stack(items.targets)))
    same = unseen(edits[labels[0]], edits[labels[1]]) if len(labels) == 2 else None
    order, marks, title = grid_rows(per_model, labels, flips, len(items), k, same)
    k = min(k, len(order))
    if k:
        pick = torch.as_tensor(order[:k])
        before_after(
            grid,
            [(t, x[pick]) for t, x in columns],
            [f"{m}{items.instructions[i]}" for m, i in zip(marks[:k], order[:k], strict=True)],
            max_rows=k,
            title=title,
        )
    summary = {
        "mode": mode,
        "models": models,
        "comparison": f"{labels[1]} - {labels[0]}" if len(labels) == 2 else None,
        "num_items": len(items),
        "seed": seed,
        "bootstrap": {"method": "percentile", "resamples": resamples, "confidence": confidence},
        "clip_model": clip_model or None,
        "metric_info": info,
        "metrics": metrics,
        "differences": differences,
        "flips": flips,
        "items": rows,
        "skipped": items.skipped,
        "files": {"json": str(out_json), "before_after": str(grid) if k else None},
        "config": to_dict(config),
    }
    summary = _clean(summary)
    out_json.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def flip_counts(a: np.ndarray, b: np.ndarray) -> dict[str, int] | None:
    """For a 0/1 per-item metric (e.g. `oracle_edit.success`) of models A and B on the same items:
    how many items B fixed (A 0, B 1) and broke (A 1, B 0); None for other metrics."""
    both = np.isfinite(a) & np.isfinite(b)
    if not both.any() or not np.isin(np.concatenate([a[both], b[both]]), (0.0, 1.0)).all():
        return None
    return {"fixed": int(((a == 0) & (b == 1)).sum()), "broken": int(((a == 1) & (b == 0)).sum())}


def grid_rows(
    per_model: dict, labels: list[str], flips: dict, n: int, k: int = 8, looks_same: list[bool] | None = None
) -> tuple[list[int], list[str], str]:
    """The before/after grid's rows (at most `k`), a mark per row and its title line. With two models
    and a 0/1 metric (a `.success` one first): the items B broke take up to half the rows, the items it
    fixed the others (either fills what the other leaves), then unchanged items; the title says how
    many of each there are and are shown. `looks_same[i]` (`trainer.evaluate.visible.unseen`) marks a
    row whose two edits look the same at a glance (a threshold crossing more than a visible change)."""
    if not flips:
        return list(range(n))[:k], [""] * min(n, k), ""
    name = next((m for m in flips if m.endswith(".success")), next(iter(flips)))
    a, b = per_model[labels[0]][name], per_model[labels[1]][name]
    fixed = [i for i in range(n) if a[i] == 0 and b[i] == 1]
    broken = [i for i in range(n) if a[i] == 1 and b[i] == 0]
    nb = min(len(broken), k // 2)
    nf = min(len(fixed), k - nb)
    nb = min(len(broken), k - nf)
    flipped = set(fixed) | set(broken)
    rest = [i for i in range(n) if i not in flipped][: k - nf - nb]
    order = fixed[:nf] + broken[:nb] + rest
    marks = ["[fixed] "] * nf + ["[broken] "] * nb + [""] * len(rest)
    same = looks_same or [False] * n
    marks = [m + ("[looks the same] " if m and same[i] else "") for m, i in zip(marks, order, strict=True)]
    unseen_shown = sum(1 for m in marks if "looks the same" in m)
    title = (
        f"{name}, {labels[0]} -> {labels[1]} on {n} held-out edits (same noise): {len(fixed)} fixed "
        f"(failure -> success), {len(broken)} broken (success -> failure). Rows: {nf} fixed, {nb} broken"
        + (f", {len(rest)} unchanged" if rest else "")
        + (
            f"; {unseen_shown} marked [looks the same]: at most 1 % of pixels differ by CIELAB Delta E > 10"
            if looks_same
            else ""
        )
    )
    return order, marks, title


def _common(config: Config, clip_model: str) -> tuple[dict, ClipMetric | None]:
    scorers = build_scorers(config.reward)
    clip = ClipMetric(clip_model, resolve_device(config.run.device)) if clip_model else None
    return scorers, clip


def evaluate_edits(
    edits: str | Path,
    config: Config | str | Path | None = None,
    out_dir: str | Path = "eval",
    *,
    overrides: Sequence[str] = (),
    instruction: str | None = None,
    num_items: int | None = None,
    seed: int = 0,
    clip_model: str = "",
    resamples: int = 2000,
    confidence: float = 0.95,
    grid_items: int = 8,
    skip_bad: bool = False,
    json_name: str = "eval.json",
) -> dict[str, Any]:
    """Judge precomputed edits (a JSONL file or folder, see `trainer.evaluate.inputs`); images are read
    at `config.model.resolution`. Writes `out_dir/json_name` and `out_dir/before_after.png`; returns
    the summary written to the JSON (its model label is "A")."""
    cfg = resolve_config((), config, overrides)
    items = read_edits(edits, cfg.model.resolution, instruction, skip_bad).head(num_items)
    scorers, clip = _common(cfg, clip_model)
    models = [{"label": "A", "spec": str(edits), "kind": "edits", "short": "edit"}]
    return _finish(
        "edits", cfg, items, models, {"A": items.edited}, scorers, clip, Path(out_dir) / json_name,
        seed, None, resamples, confidence, grid_items, clip_model,
    )  # fmt: skip


def evaluate_models(
    models: Sequence[str],
    config: Config | str | Path | None = None,
    out_dir: str | Path = "eval",
    num_items: int | None = None,
    seed: int = 0,
    *,
    overrides: Sequence[str] = (),
    inputs: str | Path | None = None,
    instruction: str | None = None,
    labels: Sequence[str] | None = None,
    clip_model: str = "",
    batch_size: int = 8,
    resamples: int = 2000,
    confidence: float = 0.95,
    grid_items: int = 8,
    skip_bad: bool = False,
    progress: bool = False,
    json_name: str = "eval.json",
) -> dict[str, Any]:
    """Generate edits with one or two models on the same inputs and noise, and judge them.

    Args:
        models: one or two of: a run folder or checkpoint folder, a diffusers model folder, "tiny",
            a hub id.
        config: the evaluation config (a Config or a YAML preset; default: the first run's own
            config); `overrides` (`--set` items) apply on top.
        out_dir: where `json_name` and `before_after.png` are written.
        num_items: evaluate the first n inputs (default: all).
        seed: noise seed (item i uses `noise_seed(seed, i)`) and bootstrap seed.
        inputs: a JSONL file or an image folder of inputs (sets data.source and data.path; the
            formats of `trainer.data.inputs`); by default the config's `data` section gives the inputs.
        instruction: the instruction of inputs that have none (sets data.instructions).
        labels: names of the models in the summary (default "A", "B").
        clip_model: a CLIP model folder or hub id for the CLIP metrics ("" : none).

    Returns:
        The summary written to the JSON: "metrics"[label][metric] = {"mean", "std", "n", "ci_low",
        "ci_high"}, "differences"[metric] (B - A, with "excludes_zero"), "items", "models"...
    """
    if not 1 <= len(models) <= 2:
        raise UserError(f"give one or two models, got {len(models)}")
    labels = list(labels or DEFAULT_LABELS[: len(models)])
    if len(labels) != len(models) or len(set(labels)) != len(labels):
        raise UserError(f"--label: give {len(models)} distinct labels, got {labels}")
    cfg = resolve_config(models, config, [*overrides, *input_overrides(inputs, instruction, skip_bad)])
    if num_items is not None and cfg.data.source in ("shapes", "synthetic"):
        cfg = with_overrides(cfg, [f"data.num_items={num_items}"])  # drawn sources: draw exactly that many
    specs = [model_spec(str(m), label, cfg) for m, label in zip(models, labels, strict=True)]
    items = items_from_config(cfg).head(num_items)
    if not len(items):
        raise UserError("no inputs to evaluate (data gives none, or num_items is 0)")
    scorers, clip = _common(cfg, clip_model)
    seeds = [noise_seed(seed, i) for i in range(len(items))]
    edits = {}
    for spec in specs:
        policy = load_policy(spec)
        edits[spec.label] = sample_edits(
            policy, items.sources, items.instructions, seeds, items.exemplars, batch_size, progress
        )
        del policy
        gc.collect()
    return _finish(
        "models", cfg, items, [s.describe() for s in specs], edits, scorers, clip,
        Path(out_dir) / json_name, seed, seeds, resamples, confidence, grid_items, clip_model,
    )  # fmt: skip


def format_table(summary: dict[str, Any], max_metrics: int = 40) -> str:
    """A short text table: mean [CI] per metric and model, and the difference B - A."""
    labels = [m["label"] for m in summary["models"]]
    ci = lambda s: "n/a" if s["mean"] is None else f"{s['mean']:.4f} [{s['ci_low']:.4f}, {s['ci_high']:.4f}]"  # noqa: E731
    names = list(summary["metrics"][labels[0]])[:max_metrics]
    width = max([len(n) for n in names] + [6])
    head = [f"{'metric':<{width}}"] + [f"{label:<26}" for label in labels]
    if summary["differences"]:
        head.append(summary["comparison"])
    lines = [f"{m['label']}: {m['spec']} ({m['kind']})" for m in summary["models"]]
    lines.append("  ".join(head))
    for n in names:
        cells = [f"{n:<{width}}"] + [f"{ci(summary['metrics'][label][n]):<26}" for label in labels]
        d = summary["differences"].get(n)
        if d:
            cells.append(ci(d) + (" *" if d["excludes_zero"] else ""))
        lines.append("  ".join(cells))
    for n, f in summary.get("flips", {}).items():
        lines.append(f"{n}: {f['fixed']} items went from failure to success, {f['broken']} back")
    conf = summary["bootstrap"]["confidence"]
    lines.append(f"(n = {summary['num_items']} items; [{conf:.0%} bootstrap CI]; * : the CI excludes 0)")
    return "\n".join(lines)
