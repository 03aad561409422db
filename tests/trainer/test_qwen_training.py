"""Training the tiny Qwen-Image-Edit: LoRA on both streams' attention projections (identity at start,
an update moves only the adapters), and GRPO learning brightness on seeds 0-2 (slow)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.loop import train
from trainer.run.log import read_metrics


@pytest.fixture
def qwen_config(tiny_config):
    """configs/tiny-qwen-edit.yaml's settings over the tiny preset, writing runs under tmp_path."""
    from trainer.config import load_config

    def make(*overrides: str):
        base = tiny_config()
        return load_config(
            "configs/tiny-qwen-edit.yaml",
            [
                f"run.output_dir={base.run.output_dir}",
                "run.quiet=true",
                f"model.tiny_dir={base.model.tiny_dir}",
                *overrides,
            ],
        )

    return make


def test_lora_on_the_transformer_attention(qwen_config):
    """LoRA adapters sit on both streams' attention projections, start as the identity (recomputed
    log-probs, true CFG included, equal the recorded ones), and one update moves only them."""
    from trainer.algo.objectives import group_advantages
    from trainer.data.inputs import load_inputs
    from trainer.engine.learner import Learner
    from trainer.engine.policy import build_policy

    config = qwen_config(
        "model.use_lora=true",
        "model.lora_rank=4",
        "train.learning_rate=1e-2",
        "sample.batch_size=4",
        "train.batch_size=8",
    )
    policy = build_policy(config)
    assert type(policy).__name__ == "QwenEditPolicy" and policy.cfg
    learner = Learner(config, policy)
    names = list(learner.params)
    assert names and all(n.startswith("transformer.") and "lora_" in n for n in names)
    for target in (".to_q.", ".to_out.0.", ".add_q_proj.", ".add_v_proj.", ".to_add_out."):
        assert any(target in n for n in names), target
    inputs = load_inputs(config.data, config.model.resolution, seed=0)
    with policy.eval_mode():
        r = policy.rollout(
            inputs.sources[:4], inputs.instructions[:4], nb_gen=2, generator=torch.Generator().manual_seed(0)
        )
    again = torch.stack([policy.step_log_prob(r, j) for j in range(r.log_probs.shape[1])], dim=1)
    torch.testing.assert_close(again, r.log_probs, atol=1e-5, rtol=0)
    frozen = {n: p.detach().clone() for n, p in policy.denoiser.named_parameters() if "lora_" not in n}
    before = learner.trainable_state()
    r.item_ids = [f"i{i}" for i in range(len(r))]
    r.advantages = group_advantages(r.images.mean(dim=(1, 2, 3)), r.group).float()
    learner.train(r, torch.Generator().manual_seed(0))
    after = learner.trainable_state()
    assert any(not torch.equal(before[n], after[n]) for n in names)
    assert all(torch.equal(p, frozen[n]) for n, p in policy.denoiser.named_parameters() if "lora_" not in n)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qwen_edit_learns_brightness(qwen_config, tmp_path, seed):
    """GRPO (PPO-clip on SDE log-probs, true CFG) makes the tiny Qwen-Image-Edit's edits brighter than
    the base model's on 64 inputs under the same noise, sampled with the ODE: a paired gain above
    0.01 and 4 standard errors."""
    from trainer.evaluate.compare import evaluate_models

    config = qwen_config(
        f"run.seed={seed}", "run.name=qwen-ppo", "run.num_epochs=4", "sample.num_batches_per_epoch=4",
        "run.image_log_freq=0", "run.save_freq=100",
    )  # fmt: skip
    run_dir = train(config)
    assert all(m["nonfinite_skipped"] == 0 for m in read_metrics(run_dir))
    summary = evaluate_models(
        ["tiny-qwen-edit", str(run_dir)], None, tmp_path / "eval", num_items=64, seed=100 + seed,
        labels=["base", "trained"], resamples=200, grid_items=0, overrides=["sample.noise_level=0"],
    )  # fmt: skip
    diff = summary["differences"]["brightness"]
    se = diff["std"] / math.sqrt(diff["n"])
    print(seed, f"paired gain {diff['mean']:+.4f} = {diff['mean'] / se:.1f} SE")
    assert diff["mean"] > max(0.01, 4 * se), diff
