"""`spie train`, `spie sft` and `spie generate`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from trainer.errors import UserError


def add_overrides(parser, example: str, what: str = "override a field") -> None:
    """The `--set KEY=VALUE` option (repeatable) that every config-driven command takes."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"{what}, e.g. {example}",
    )


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train an editor with RL from AI feedback")
    p.add_argument("--config", help="YAML preset (configs/*.yaml)")
    add_overrides(p, "train.learning_rate=1e-5")
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="build every model at its real architecture on the meta device, check the LoRA targets and "
        "one full-size train step, and print a memory plan per process (no weights, hub or GPU)",
    )
    p.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory for --dry-run's plan (GiB)")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="report bad input items (one line each, on stderr) and train on the good ones",
    )
    p.add_argument(
        "--ray",
        action="store_true",
        help="sample and learn in Ray actors (a local Ray unless RAY_ADDRESS is set; the default "
        "unless the config sets ray.enabled: false)",
    )
    p.add_argument(
        "--no-ray",
        action="store_true",
        help="sample and learn in this process, without Ray (sets ray.enabled=false)",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="join this Ray cluster (e.g. auto, 10.0.0.1:6379); implies --ray",
    )
    p.set_defaults(func=cmd_train)

    f = subparsers.add_parser(
        "sft", help="supervised InstructPix2Pix fine-tuning (the warm start before RL, e.g. the toy editor)"
    )
    f.add_argument("--config", required=True, help="YAML preset (e.g. configs/sft-toy.yaml)")
    add_overrides(f, "sft.steps=100")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    f.set_defaults(func=cmd_sft)

    g = subparsers.add_parser(
        "generate", help="edit a folder of images with a trained run or checkpoint, or a base model"
    )
    g.add_argument(
        "--checkpoint",
        required=True,
        help="run folder (its latest checkpoint), checkpoint folder, or base model (tiny, a diffusers folder, a hub id)",
    )
    g.add_argument("--images", required=True, help="folder of source images")
    g.add_argument("--instruction", required=True, help="the edit instruction")
    g.add_argument("--out", required=True, help="output folder for the edits")
    g.add_argument("--seed", type=int, default=0, help="noise seed")
    add_overrides(g, "sample.num_steps=50", "override a sampling field")
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=cmd_generate)


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.config import load_config
    from trainer.loop import ensure_run_config, train

    overrides = list(args.overrides) + (["run.quiet=true"] if args.quiet else [])
    if args.skip_bad:
        overrides.append("data.skip_bad=true")
    if args.no_ray and (args.ray or args.ray_address):
        raise UserError("give either --no-ray or --ray / --ray-address")
    if args.ray or args.ray_address:
        overrides.append("ray.enabled=true")
    if args.no_ray:
        overrides.append("ray.enabled=false")
    if args.ray_address:
        overrides.append(f"ray.address={json.dumps(args.ray_address)}")  # quoted YAML
    if args.resume:
        if args.config:
            raise UserError("give either --config or --resume (a resumed run uses its own config.yaml)")
        run_dir = Path(args.resume)
        config = load_config(ensure_run_config(run_dir), overrides)
        train(config, resume=run_dir)
        return 0
    if not args.config:
        raise UserError("--config is required (e.g. --config configs/tiny.yaml)")
    if args.dry_run:
        from trainer.plan import dry_run

        print(dry_run(load_config(args.config, overrides), gpu_gib=args.gpu_gib))
        return 0
    config = load_config(args.config, overrides)
    from trainer.engine.policy import check_models

    check_models(config)  # a model that cannot be had fails here, in one line, before Ray starts
    train(config)
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    from trainer.config import load_config
    from trainer.sft import sft

    overrides = list(args.overrides) + (["run.quiet=true"] if args.quiet else [])
    sft(load_config(args.config, overrides))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from trainer.generate import generate

    if not args.instruction.strip():
        raise UserError("--instruction is empty")
    written = generate(
        args.checkpoint,
        args.images,
        args.instruction,
        args.out,
        args.seed,
        args.overrides,
        progress=not args.quiet,
    )
    print(f"[spie] wrote {len(written)} edits to {args.out}")
    return 0
