"""Training the tiny Qwen-Image-Edit: LoRA on both streams' attention projections (identity at start,
an update moves only the adapters), and GRPO learning brightness on seeds 0-2 (slow)."""

from __future__ import annotations

import functools

import pytest

from trainer.loop import train
from trainer.run.log import read_metrics


@pytest.fixture
def qwen_config(editor_config):
    """configs/tiny-qwen-edit.yaml's settings over the tiny preset, writing runs under tmp_path."""
    return functools.partial(editor_config, "configs/tiny-qwen-edit.yaml")


def test_lora_on_the_transformer_attention(qwen_config, lora_update_moves_only_lora):
    """LoRA adapters sit on both streams' attention projections, start as the identity (recomputed
    log-probs, true CFG included, equal the recorded ones), and one update moves only them."""
    config = qwen_config(
        "model.use_lora=true",
        "model.lora_rank=4",
        "train.learning_rate=1e-2",
        "sample.batch_size=4",
        "train.batch_size=8",
    )
    policy = lora_update_moves_only_lora(
        config, (".to_q.", ".to_out.0.", ".add_q_proj.", ".add_v_proj.", ".to_add_out.")
    )
    assert type(policy).__name__ == "QwenEditPolicy" and policy.cfg


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_qwen_edit_learns_brightness(qwen_config, tmp_path, seed, brightness_gain_over_base):
    """GRPO (PPO-clip on SDE log-probs, true CFG) makes the tiny Qwen-Image-Edit's edits brighter than
    the base model's on 64 inputs under the same noise, sampled with the ODE: a paired gain above
    0.01 and 4 standard errors."""
    config = qwen_config(
        f"run.seed={seed}", "run.name=qwen-ppo", "run.num_epochs=4", "sample.num_batches_per_epoch=4",
        "run.image_log_freq=0", "run.save_freq=100",
    )  # fmt: skip
    run_dir = train(config)
    assert all(m["nonfinite_skipped"] == 0 for m in read_metrics(run_dir))
    brightness_gain_over_base(
        "tiny-qwen-edit", run_dir, tmp_path, seed, "qwen", overrides=["sample.noise_level=0"]
    )
