"""The first GPU hour (issue 22, item 5), prepared for the next lent device: one run, one table.

For each preset: the run's editor policy at its real architecture with random weights in the run's
precision (speed does not depend on the weights; `trainer.plan.step.meta_policy(..., device)`), then

- the sampling model call for `sample.batch_size x nb_gen` edits (no grad): ms per call and edits/s
  per denoising step;
- one train step (the learner's `step_log_prob` forward and backward at `train.batch_size`): its time
  and its measured peak (`torch.cuda.max_memory_allocated` above the weights) against the dry run's
  planned step peak (`trainer.plan.step.train_step` on meta; the aim: within 15 %).

    python -m bench.gpu_first_hour configs/spie-a100.yaml configs/kontext-h100.yaml --out docs/gpu-hour.json
    python -m bench.gpu_first_hour configs/tiny.yaml --device cpu      # a smoke run on the CPU

Not yet here: images/s of the whole rollout against the diffusers pipeline at the same settings
(that needs the tokenizers, which random weights do not come with).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

# The repository root, not bench/ (whose queue.py would shadow the standard library).
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from sampler.editors import TINY_FAMILIES, editor_family, load_editor  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.engine.policy import trainable_parameters  # noqa: E402
from trainer.plan.arch import arch_folder  # noqa: E402
from trainer.plan.step import fake_rollout, meta_policy, train_step  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `fn` over `repeats` calls after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(preset: str, device: torch.device, repeats: int, overrides: list[str]) -> dict:
    config = load_config(preset, overrides)
    m = config.model
    kept = arch_folder(m.pretrained) if m.pretrained not in TINY_FAMILIES else None
    family = editor_family(str(kept) if kept else m.pretrained, m.editor)
    editor = load_editor(family)
    if kept is None:
        kept = arch_folder(editor.tiny_model(m.tiny_dir, config.run.seed))
    planned_policy = meta_policy(config, family, kept)
    trainable_parameters(planned_policy, m.use_lora)  # marks what the learner trains requires_grad
    planned = train_step(planned_policy, family, config)
    policy = meta_policy(config, family, kept, device)
    trainable_parameters(policy, m.use_lora)
    n = config.sample.batch_size * config.sample.nb_gen
    batch = fake_rollout(policy, family, config, n)
    index = torch.zeros(n, dtype=torch.long, device=device)

    @torch.no_grad()
    def sample_call():
        if family == "instruct_pix2pix":
            policy.guided_noise(batch.latents[:, 0], index, batch.text_embeds, batch.image_latents)
        else:
            policy.velocity(batch.latents[:, 0], index, policy._cond(batch))

    sample_s = _timed(sample_call, device, repeats)
    train_batch = fake_rollout(policy, family, config, config.train.batch_size)
    policy.denoiser.train()

    def train_call():
        policy.step_log_prob(train_batch, 0).float().sum().backward()
        policy.denoiser.zero_grad(set_to_none=True)

    train_call()  # warm-up, then the measured peak of one step
    peak = None
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        train_call()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    train_s = _timed(train_call, device, repeats)
    row = {
        "preset": preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "resolution": m.resolution,
        "sampling_edits": n,
        "sampling_call_ms": round(sample_s * 1e3, 2),
        "sampling_edit_steps_per_s": round(n / sample_s, 2),
        "train_micro_batch": config.train.batch_size,
        "train_step_ms": round(train_s * 1e3, 2),
        "planned_step_peak_gib": round(planned.peak / 2**30, 3),
        "measured_step_peak_gib": None if peak is None else round(peak / 2**30, 3),
    }
    if peak:
        row["measured_over_planned"] = round(peak / planned.peak, 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="+")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for preset in args.presets:
        row = measure(preset, torch.device(args.device), args.repeats, args.overrides)
        print(json.dumps(row), flush=True)
        rows.append(row)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
