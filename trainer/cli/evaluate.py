"""`spie evaluate` and `spie plot`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trainer.cli.train import add_overrides
from trainer.errors import UserError

_EPILOG = """\
examples:
  spie evaluate --edits edits.jsonl --config configs/tiny.yaml --out eval/eval.json
  spie evaluate --model models/toy-editor --model runs/demo --set data.split=heldout --num-items 64
  spie evaluate --model tiny --model runs/tiny --inputs inputs.jsonl --clip-model openai/clip-vit-base-patch32
  spie evaluate --benchmark gedit-bench-en --benchmark-dir GEdit-Bench/ --model A --model B --judge QWEN_VL
  (benchmarks: docs/benchmarks.md)

edits: a JSONL file ({"source", "output", "instruction"[, "mask", "target", "metadata"]} per line,
paths relative to the file) or a folder with source/, output/ (same file stems), optional mask/ and
target/, and instruction/<stem>.txt per item (or --instruction for all).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="judge edits or compare two models on the same inputs and noise, with bootstrap CIs",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--edits", metavar="PATH", help="precomputed edits: a JSONL file or a folder")
    src.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="MODEL",
        help="a run or checkpoint folder, a diffusers model folder, 'tiny' or a hub id; give it twice "
        "to compare (B - A)",
    )
    p.add_argument("--config", help="YAML preset (default: the first run's own config)")
    add_overrides(p, "data.split=heldout or sample.num_steps=50")
    p.add_argument("--inputs", metavar="PATH", help="inputs (JSONL or folder) instead of the config's data")
    p.add_argument("--instruction", help="instruction for every item that has none of its own")
    p.add_argument("--num-items", type=int, metavar="N", help="evaluate the first N items (default: all)")
    p.add_argument("--seed", type=int, default=0, help="noise and bootstrap seed (default 0)")
    p.add_argument("--label", dest="labels", action="append", help="name of each --model in the output")
    p.add_argument(
        "--scorers",
        metavar="NAMES",
        help="comma-separated scorers replacing reward.scorers, e.g. oracle_edit",
    )
    p.add_argument("--clip-model", default="", metavar="PATH_OR_ID", help="CLIP model for the CLIP metrics")
    p.add_argument("--batch-size", type=int, default=8, help="inputs per generation batch (default 8)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default 2000)")
    p.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    p.add_argument("--grid-items", type=int, default=8, help="rows of before_after.png (default 8)")
    p.add_argument("--out", default="eval/eval.json", help="JSON output; before_after.png goes next to it")
    p.add_argument("--skip-bad", action="store_true", help="leave out bad items instead of stopping")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    b = p.add_argument_group("benchmarks (docs/benchmarks.md)")
    b.add_argument("--benchmark", choices=("gedit-bench-en", "imgedit"), help="run a benchmark with --model")
    b.add_argument("--benchmark-dir", metavar="DIR", help="the benchmark's folder, in its published format")
    b.add_argument("--judge", metavar="PATH_OR_ID", help="the Qwen-VL judge (vlm_judge) of the benchmark")
    b.add_argument("--judge-revision", default="", help="the judge's revision, written into the output")
    b.add_argument(
        "--judge-repeats", type=int, default=0, metavar="N", help="re-judge N items: the judge's spread"
    )
    b.add_argument("--judge-device", default="cpu", help="the judge's torch device (default cpu)")
    b.add_argument("--judge-dtype", default="float32", help="float32, float16 or bfloat16")
    p.set_defaults(func=cmd_evaluate)

    c = subparsers.add_parser("plot", help="plot a run's reward curve (reward_curve.png)")
    c.add_argument("run", help="run folder (or its metrics.jsonl)")
    c.add_argument("--out", help="PNG path (default: <run>/reward_curve.png)")
    c.set_defaults(func=cmd_plot)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from trainer.evaluate.compare import evaluate_edits, evaluate_models, format_table

    for name in ("num_items", "batch_size", "resamples", "grid_items"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "grid_items" else 1):
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not 0 < args.confidence < 1:
        raise UserError(f"--confidence must be in (0, 1), got {args.confidence}")
    overrides = list(args.overrides)
    if args.benchmark:
        return cmd_benchmark(args, overrides)
    if args.scorers:
        names = [n.strip() for n in args.scorers.split(",") if n.strip()]
        overrides.append("reward.scorers=" + json.dumps([{"name": n} for n in names]))
    out = Path(args.out)
    common = dict(
        overrides=overrides,
        instruction=args.instruction,
        seed=args.seed,
        clip_model=args.clip_model,
        resamples=args.resamples,
        confidence=args.confidence,
        grid_items=args.grid_items,
        skip_bad=args.skip_bad,
        json_name=out.name,
    )
    if args.edits:
        if args.inputs or args.labels:
            raise UserError("--inputs and --label go with --model, not --edits")
        summary = evaluate_edits(args.edits, args.config, out.parent, num_items=args.num_items, **common)
    else:
        summary = evaluate_models(
            args.models,
            args.config,
            out.parent,
            args.num_items,
            inputs=args.inputs,
            labels=args.labels,
            batch_size=args.batch_size,
            progress=not args.quiet,
            **common,
        )
    print(format_table(summary))
    for bad in summary["skipped"]:
        print(f"[spie] skipped {bad['where']}: {bad['error']}")
    files = summary["files"]
    print(
        f"[spie] wrote {files['json']}" + (f" and {files['before_after']}" if files["before_after"] else "")
    )
    return 0


def cmd_benchmark(args: argparse.Namespace, overrides: list[str]) -> int:
    from trainer.evaluate.bench_run import format_benchmark, run_benchmark

    if not args.models or not args.benchmark_dir or not args.judge:
        raise UserError("--benchmark needs --model (once or twice), --benchmark-dir and --judge")
    if args.judge_repeats < 0:
        raise UserError(f"--judge-repeats must be >= 0, got {args.judge_repeats}")
    out = Path(args.out).parent
    summary = run_benchmark(
        args.benchmark,
        args.benchmark_dir,
        args.models,
        args.judge,
        args.config,
        out,
        overrides=overrides,
        labels=args.labels,
        num_items=args.num_items,
        seed=args.seed,
        judge_revision=args.judge_revision,
        judge_repeats=args.judge_repeats,
        judge_kwargs={"device": args.judge_device, "dtype": args.judge_dtype},
        resamples=args.resamples,
        confidence=args.confidence,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    print(format_benchmark(summary))
    print(f"[spie] wrote {out / 'benchmark.json'} and {out / 'benchmark.md'}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from trainer.run.plots import reward_curve

    run = Path(args.run)
    metrics = run if run.suffix == ".jsonl" else run / "metrics.jsonl"
    out = Path(args.out) if args.out else metrics.parent / "reward_curve.png"
    print(f"[spie] wrote {reward_curve(metrics, out)}")
    return 0
