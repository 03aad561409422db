"""Training the flow editor (tiny FLUX.1 Kontext): LoRA on the transformer, GRPO and DiffusionNFT
learning brightness on seeds 0-2, checked on held-out noise with the paired comparison."""

from __future__ import annotations

import functools

import pytest

from trainer.loop import train
from trainer.run.log import read_metrics

KONTEXT = ["model.pretrained=tiny-kontext", "model.editor=flux_kontext", "model.use_lora=false"]


@pytest.fixture
def kontext_config(editor_config):
    """configs/tiny-kontext.yaml's settings over the tiny preset, writing runs under tmp_path."""
    return functools.partial(editor_config, "configs/tiny-kontext.yaml")


def test_lora_on_the_transformer_attention(kontext_config, lora_update_moves_only_lora):
    """LoRA adapters sit on both streams' attention projections, start as the identity (recomputed
    log-probs equal the recorded ones), and one update moves only them."""
    config = kontext_config(
        "model.use_lora=true",
        "model.lora_rank=4",
        "train.learning_rate=1e-2",
        "sample.batch_size=4",
        "train.batch_size=8",
    )
    lora_update_moves_only_lora(config, (".add_q_proj.", ".to_out.0."))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("objective", ["ppo", "nft"])
def test_flow_editor_learns_brightness(kontext_config, tmp_path, objective, seed, brightness_gain_over_base):
    """GRPO (PPO-clip on SDE log-probs) and DiffusionNFT each make the tiny Kontext's edits brighter than
    the base model's on 64 inputs under the same noise, sampled with the ODE (noise level 0): a paired
    gain above 0.01 and 4 standard errors."""
    config = kontext_config(
        f"train.objective={objective}", f"run.seed={seed}", f"run.name=flow-{objective}",
        "run.num_epochs=4", "sample.num_batches_per_epoch=4", "run.image_log_freq=0", "run.save_freq=100",
    )  # fmt: skip
    run_dir = train(config)
    assert all(m["nonfinite_skipped"] == 0 for m in read_metrics(run_dir))
    brightness_gain_over_base(
        "tiny-kontext", run_dir, tmp_path, seed, objective, overrides=["sample.noise_level=0"]
    )
