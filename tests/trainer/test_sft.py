"""`spie sft`: a few supervised InstructPix2Pix steps through the same code that builds the toy editor."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sampler.models import load_components
from trainer.data.inputs import load_inputs
from trainer.errors import UserError
from trainer.sft import SFTTrainer, dropout_masks, sft

SYNTHETIC = ["data.source=synthetic", "data.split=train", "data.num_items=64", "model.use_lora=false"]


def test_conditioning_dropout_rates():
    """Text only, image only and both are each dropped with probability p; the rest keep both."""
    drop_text, drop_image = dropout_masks(200_000, 0.05, torch.Generator().manual_seed(0))
    rates = {
        "text only": (drop_text & ~drop_image).float().mean().item(),
        "image only": (~drop_text & drop_image).float().mean().item(),
        "both": (drop_text & drop_image).float().mean().item(),
    }
    for name, rate in rates.items():
        assert abs(rate - 0.05) < 0.003, (name, rate)
    assert abs((~drop_text & ~drop_image).float().mean().item() - 0.85) < 0.003


def test_sft_steps_lower_the_loss_on_a_fixed_batch(tiny_config):
    config = tiny_config(
        *SYNTHETIC, "sft.batch_size=16", "sft.learning_rate=1e-3", "sft.warmup_steps=1", previous=True
    )
    inputs = load_inputs(config.data, config.model.resolution, seed=0)
    trainer = SFTTrainer(config, inputs)
    trainer.prepare()
    probe = torch.arange(16)

    def probe_loss() -> float:
        trainer.generator.manual_seed(123)  # the same noise, timesteps and dropout every time
        with torch.no_grad():
            return trainer.loss(probe).item()

    before = probe_loss()
    trainer.generator.manual_seed(0)
    for _ in range(30):
        trainer.train_step()
    after = probe_loss()
    print(f"probe loss {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before


def test_sft_writes_a_loadable_model_with_ema(tiny_config, tmp_path):
    out = tmp_path / "editor"
    config = tiny_config(
        *SYNTHETIC,
        "sft.steps=3",
        "sft.batch_size=4",
        "sft.vae_steps=2",
        "sft.ema_decay=0.9",
        "sft.train_text_encoder=true",
        f"sft.output_dir={out}",
        previous=True,
    )
    assert sft(config) == out
    recipe = json.loads((out / "spie_sft.json").read_text())
    assert recipe["steps"] == 3 and recipe["final_loss"] > 0
    assert len((out / "sft_log.jsonl").read_text().splitlines()) == 1
    c = load_components(str(out))
    assert c.unet.config.in_channels == 8
    # RL starts from it like from any InstructPix2Pix folder.
    from trainer.engine.policy import build_policy

    policy = build_policy(tiny_config(f"model.pretrained={out}", previous=True))
    r = policy.rollout(
        inputs := torch.rand(1, 3, 32, 32), ["make the circle red"], generator=torch.Generator()
    )
    assert r.images.shape == inputs.shape


def test_sft_refuses_data_without_targets(tiny_config, tmp_path):
    with pytest.raises(UserError, match=r"data\.source='shapes'.*no target"):
        sft(tiny_config("data.source=shapes", f"sft.output_dir={tmp_path / 'x'}", previous=True))


def test_spie_sft_cli_rejects_a_bad_field(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.cli",
            "sft",
            "--config",
            "configs/sft-toy.yaml",
            "--set",
            "sft.stepz=3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "sft.stepz" in proc.stderr and "Traceback" not in proc.stderr
