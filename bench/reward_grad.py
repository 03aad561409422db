"""AlignProp step with the reward's gradient served over gRPC against the same step in process
(`python bench/reward_grad.py`).

One step = `trainer.engine.alignprop.alignprop_epoch` on one sampling batch of 8 edits (4 inputs x
2): sample with a graph through the last K steps and the decoder, score with the differentiable
reward, backpropagate, clip, step. In process the reward model runs inside the trainer and autograd
runs through it; over gRPC a `spie serve` subprocess on loopback receives each edit with its float32
tensor and `want_gradient`, and returns the score and d score / d edit, which the trainer
backpropagates (`trainer.rewards.differentiable.ServedGradient`).

The reward is the tiny seeded LAION aesthetic model of the tests (CLIP ViT, 32 px) on the 32 px
editor of the tests' earlier tiny preset (6 DDIM steps, LoRA), K fixed (`--k`, default 1: the
cheapest step, where the wire's share of the time is largest). Steps are timed in pairs whose order
alternates (in process then gRPC, gRPC then in process, ...) after `--warmup` untimed steps of each;
every step starts from the same weights and optimiser state (restored outside the timing), so both
sides do the same work, optimiser step included. Reported: the median of the paired ratios with its
spread, and the load average. Target: gRPC / in-process <= 1.25.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/ holds queue.py: take the folder off sys.path so `import queue` finds the standard library.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
os.chdir(ROOT)  # configs/ and the tiny model cache are relative to the checkout

from bench.paired import load_line, paired_times, ratios, spread  # noqa: E402
from bench.reward_server import launch_server, stop_server  # noqa: E402

SETTINGS = [  # the tests' earlier tiny preset (tests/conftest.py PREVIOUS_TINY), as AlignProp
    "model.use_lora=true",
    "model.resolution=32",
    "sample.num_steps=6",
    "sample.guidance_scale=3.0",
    "sample.image_guidance_scale=1.5",
    "sample.shared_noise=false",
    "train.objective=alignprop",
    "train.learning_rate=1e-4",
    "run.quiet=true",
]


def start_grpc(scorer: str, kwargs: dict, folder: Path):
    """A `spie serve` subprocess on loopback; returns (process, target)."""
    import yaml

    config = folder / "serve.yaml"
    config.write_text(
        yaml.safe_dump({"scorer": kwargs, "batching": {"max_batch_size": 64, "max_queue_delay_ms": 0}})
    )
    return launch_server(scorer, config, module="reward_servers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per transport")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per transport first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--k",
        type=int,
        default=1,
        help="steps backpropagated through (1: the cheapest step, where the wire's share is largest)",
    )
    parser.add_argument("--smoke", action="store_true", help="2 pairs after 1 warm-up (the smoke test)")
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.warmup = 2, 1

    import torch

    from reward_servers.aesthetic import save_tiny
    from reward_servers.base import build_scorer
    from reward_servers.client import ScorerClient
    from trainer.config import load_config
    from trainer.data.inputs import load_inputs
    from trainer.engine.alignprop import alignprop_epoch
    from trainer.engine.local import LocalEngine
    from trainer.engine.shards import epoch_generator, plan_epoch
    from trainer.rewards.differentiable import InProcessGradients, grpc_gradients

    folder = Path(tempfile.mkdtemp(prefix="reward-grad-"))
    kwargs = {"model_id": save_tiny(str(folder / "aesthetic")), "mlp_path": "aesthetic_mlp.safetensors"}
    config = load_config(
        "configs/tiny.yaml",
        [
            *SETTINGS,
            f"run.seed={args.seed}",
            "sample.batch_size=4",
            "sample.nb_gen=2",
            "reward.scorers=[{name: aesthetic, weight: 1.0}]",
            f"train.backprop_min_steps={args.k}",
            f"train.backprop_max_steps={args.k}",
        ],
    )
    engine = LocalEngine(config)
    inputs = load_inputs(config.data, config.model.resolution, seed=args.seed)
    gen = epoch_generator(args.seed, 0)
    shard = plan_epoch(inputs, config, 0, gen, engine.latent_shape)[0]
    local = InProcessGradients({"aesthetic": build_scorer("aesthetic", **kwargs)})
    proc, target = start_grpc("aesthetic", kwargs, folder)
    # Every timed step starts from the same weights and optimiser state (restored outside the timing),
    # so the two transports do the same work; each step includes its (identical) optimiser step.
    params = {k: v.detach().clone() for k, v in engine.learner.params.items()}
    opt_state = copy.deepcopy(engine.learner.optimizer.state_dict())

    def restore() -> None:
        with torch.no_grad():
            for k, v in engine.learner.params.items():
                v.copy_(params[k])
        engine.learner.optimizer.load_state_dict(copy.deepcopy(opt_state))

    def step(reward) -> float:
        restore()
        k_gen = torch.Generator().manual_seed(args.seed)
        start = time.perf_counter()
        alignprop_epoch(engine.learner, [shard], reward, k_gen)
        return time.perf_counter() - start

    print(load_line("load before"))
    try:
        with ScorerClient(target, timeout_s=120) as client:
            served = grpc_gradients({"aesthetic": client})
            t_local, t_grpc = paired_times(
                lambda: step(local), lambda: step(served), args.repeats, warmup=args.warmup
            )
            calls = args.repeats + args.warmup
            sent, received = served.bytes_sent / calls, served.bytes_received / calls
    finally:
        stop_server(proc)
    times = {"in process": t_local, "gRPC": t_grpc}
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"AlignProp step, batch 8 (4 inputs x 2), 32 px, 6 steps, K = {args.k}, tiny aesthetic reward")
    for k, v in med.items():
        print(
            f"  {k:>10}: median {v * 1000:7.1f} ms over {args.repeats} steps ({', '.join(f'{x * 1000:.0f}' for x in times[k])})"
        )
    ratio = med["gRPC"] / med["in process"]
    print(f"  ratio gRPC / in process, paired steps: {spread(ratios(t_grpc, t_local))} (target <= 1.25)")
    print(f"  ratio of the medians: {ratio:.3f}")
    print(f"  bytes per request: {sent:,.0f} sent, {received:,.0f} received (8 items)")
    print(load_line("load after"))


if __name__ == "__main__":
    main()
