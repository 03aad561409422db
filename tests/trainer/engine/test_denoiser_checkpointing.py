"""`train.denoiser_checkpointing`: the learner's denoiser recomputes its blocks in the backward pass
(what lets the full-size presets fit, docs/gpu-plan.md) and the gradient is the one without it."""

from __future__ import annotations

from pathlib import Path

import torch

from trainer.config import load_config
from trainer.engine.policy import build_policy, trainable_parameters
from trainer.plan.measure import SavedBytes
from trainer.plan.step import fake_rollout

ROOT = Path(__file__).resolve().parents[3]
TINY_CACHE = "runs/.tiny-ip2p"  # tests/conftest.py's, shared with the other tests


def _grads_and_saved(checkpointing: bool, monkeypatch):
    monkeypatch.chdir(ROOT)
    overrides = ["model.use_lora=true", "model.resolution=32", f"model.tiny_dir={TINY_CACHE}"]
    config = load_config(
        ROOT / "configs" / "tiny.yaml",
        [*overrides, f"train.denoiser_checkpointing={str(checkpointing).lower()}"],
    )
    policy = build_policy(config, torch.device("cpu"))
    assert policy.denoiser.is_gradient_checkpointing is checkpointing
    batch = fake_rollout(policy, "instruct_pix2pix", config, 4)
    g = torch.Generator().manual_seed(0)
    batch.latents = torch.randn(batch.latents.shape, generator=g)
    batch.sources = torch.rand(batch.sources.shape, generator=g)
    policy._null = policy.encode_text([""])
    params = trainable_parameters(policy, True)
    policy.denoiser.train()
    with SavedBytes(policy.denoiser) as saved:
        out = policy.step_log_prob(batch, 0)
    out.sum().backward()
    return {k: p.grad.clone() for k, p in params.items()}, saved.total


def test_denoiser_checkpointing_keeps_the_gradient_and_drops_activations(monkeypatch):
    plain, saved_plain = _grads_and_saved(False, monkeypatch)
    ckpt, saved_ckpt = _grads_and_saved(True, monkeypatch)
    assert plain.keys() == ckpt.keys() and plain
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7, msg=k)
    assert saved_ckpt < 0.7 * saved_plain, (saved_ckpt, saved_plain)
