"""Sampler overhead: our log-prob rollout against diffusers' InstructPix2Pix pipeline.

Both run the same tiny model (or `--model PATH`), batch, steps and scheduler in this process; the
figure is the median over `--runs` interleaved pairs (order alternating, two warm-ups of each) of
(our time / pipeline time), with its spread and the load average. Target: <= 1.10.

    python bench/sampler_overhead.py [--batch 8] [--steps 20] [--runs 5] [--scheduler ddim]
    python bench/sampler_overhead.py --smoke   # batch 2, 2 steps, 2 runs: the smoke test's setting
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds queue.py: take the folder off sys.path so `import queue` finds the standard library.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import statistics  # noqa: E402

import torch  # noqa: E402

from bench.interleaved import ratio_line, time_against_pipeline  # noqa: E402
from bench.paired import load_line  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help='"tiny" or a local diffusers folder / hub id')
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--scheduler", choices=["ddim", "euler_ancestral"], default="ddim")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="batch 2, 2 steps, 2 runs (the smoke test)")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.steps, args.runs = 2, 2, 2

    from diffusers import (
        DDIMScheduler,
        EulerAncestralDiscreteScheduler,
        StableDiffusionInstructPix2PixPipeline,
    )

    from sampler.models import load_components, resolve_pretrained
    from sampler.policy import EditPolicy
    from sampler.scenes import shapes_batch

    path = resolve_pretrained(args.model)
    policy = EditPolicy(
        load_components(path, scheduler=args.scheduler),
        args.scheduler,
        args.steps,
        eta=1.0,
        device=args.device,
    )
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(path, safety_checker=None).to(args.device)
    sched_cls = DDIMScheduler if args.scheduler == "ddim" else EulerAncestralDiscreteScheduler
    pipe.scheduler = sched_cls.from_pretrained(path, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    res = pipe.vae.config.sample_size if args.model == "tiny" else 256
    sources = torch.from_numpy(shapes_batch(0, args.batch, res)).permute(0, 3, 1, 2).float() / 255
    prompts = ["make it brighter"] * args.batch

    def theirs() -> None:
        pipe(
            prompts,
            image=sources,
            num_inference_steps=args.steps,
            eta=1.0,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        )

    print(load_line("load before"))
    t_ours, t_theirs, ratios = time_against_pipeline(policy, sources, prompts, theirs, args.runs, args.device)
    print(
        f"device={args.device} model={args.model} batch={args.batch} steps={args.steps} scheduler={args.scheduler}"
    )
    print(
        f"ours (with log-probs): median {statistics.median(t_ours) * 1e3:.1f} ms  runs {[round(x * 1e3, 1) for x in t_ours]}"
    )
    print(
        f"diffusers pipeline:    median {statistics.median(t_theirs) * 1e3:.1f} ms  runs {[round(x * 1e3, 1) for x in t_theirs]}"
    )
    print(ratio_line(ratios))
    print(load_line("load after"))


if __name__ == "__main__":
    main()
