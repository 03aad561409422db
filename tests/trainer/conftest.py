"""Checks and fixtures shared by the trainer tests of more than one editor family or objective."""

from __future__ import annotations

import math

import pytest
import torch


def _lora_update_moves_only_lora(config, targets: tuple[str, ...]):
    """Build the policy and learner from `config` (LoRA on), check the LoRA names cover `targets`,
    that recorded log-probs recompute (ratio 1), and that one update moves LoRA and nothing else.
    Returns the policy."""
    from trainer.algo.objectives import group_advantages
    from trainer.data.inputs import load_inputs
    from trainer.engine.learner import Learner
    from trainer.engine.policy import build_policy

    policy = build_policy(config)
    learner = Learner(config, policy)
    names = list(learner.params)
    assert names and all(n.startswith("transformer.") and "lora_" in n for n in names)
    for target in targets:
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
    return policy


@pytest.fixture
def lora_update_moves_only_lora():
    """The check above, for the flow editors' LoRA tests."""
    return _lora_update_moves_only_lora


@pytest.fixture
def editor_config(tiny_config):
    """`editor_config(preset, *overrides)`: an editor family's tiny preset (configs/tiny-kontext.yaml,
    configs/tiny-qwen-edit.yaml) with the tiny preset's run folder and model cache, quiet."""
    from trainer.config import load_config

    def make(preset: str, *overrides: str):
        base = tiny_config()
        return load_config(
            preset,
            [
                f"run.output_dir={base.run.output_dir}",
                "run.quiet=true",
                f"model.tiny_dir={base.model.tiny_dir}",
                *overrides,
            ],
        )

    return make


def _brightness_gain_over_base(
    base, run_dir, folder, seed: int, label, *, num_items=64, floor=0.01, overrides=()
):
    """The learning tests' paired check: `evaluate_models` on the base model and the trained run, on the
    same `num_items` inputs and noise (seed 100 + `seed`, under `overrides`); prints the paired
    brightness gain, which must exceed `floor` and 4 standard errors."""
    from trainer.evaluate.compare import evaluate_models
    from trainer.run.log import read_metrics

    summary = evaluate_models(
        [base, str(run_dir)], None, folder / "eval", num_items=num_items, seed=100 + seed,
        labels=["base", "trained"], resamples=200, grid_items=0, overrides=overrides,
    )  # fmt: skip
    diff = summary["differences"]["brightness"]
    se = diff["std"] / math.sqrt(diff["n"])
    print(label, seed, f"paired gain {diff['mean']:+.4f} = {diff['mean'] / se:.1f} SE")
    assert diff["mean"] > max(floor, 4 * se), (
        diff,
        [round(m.get("brightness.mean", math.nan), 4) for m in read_metrics(run_dir)],
    )


@pytest.fixture
def brightness_gain_over_base():
    """The check above, for the learning tests."""
    return _brightness_gain_over_base


@pytest.fixture
def kontext_learner(editor_config):
    """`kontext_learner(*overrides) -> (policy, learner, rollout)`: the tiny Kontext with LoRA (rank 4,
    lr 1e-2), its Learner, and one seeded rollout of 4 inputs x 2 edits with brightness advantages
    (what the upstream-fidelity tests train on before comparing with the authors' formulas)."""
    import torch

    from trainer.algo.objectives import group_advantages
    from trainer.data.inputs import load_inputs
    from trainer.engine.learner import Learner
    from trainer.engine.policy import build_policy

    def make(*overrides: str):
        config = editor_config(
            "configs/tiny-kontext.yaml",
            "model.use_lora=true", "model.lora_rank=4", "train.learning_rate=1e-2", "sample.batch_size=4",
            *overrides,
        )  # fmt: skip
        policy = build_policy(config)
        learner = Learner(config, policy)
        inputs = load_inputs(config.data, config.model.resolution, seed=0)
        with policy.eval_mode():
            r = policy.rollout(
                inputs.sources[:4],
                inputs.instructions[:4],
                nb_gen=2,
                generator=torch.Generator().manual_seed(0),
            )
        r.item_ids = [f"i{i}" for i in range(len(r))]
        r.advantages = group_advantages(r.images.mean(dim=(1, 2, 3)), r.group).float()
        return policy, learner, r

    return make


@pytest.fixture
def stub_rollout():
    """`stub_rollout(group, item_ids, latents=None)`: a one-step Rollout of len(group) edits with
    2x2 images and zero tensors elsewhere, for tests of what acts on groups, ids and scores
    (signals, SPO's pools) rather than on the model."""
    import torch

    from sampler.rollout import Rollout

    def make(group, item_ids, latents=None):
        n = len(group)
        return Rollout(
            latents=torch.zeros(n, 2, 1, 1, 1) if latents is None else latents,
            step_index=torch.zeros(n, 1, dtype=torch.long),
            log_probs=torch.zeros(n, 1),
            stochastic=torch.ones(1, dtype=torch.bool),
            text_embeds=torch.zeros(n, 1, 1),
            image_latents=torch.zeros(n, 1, 1, 1),
            images=torch.zeros(n, 3, 2, 2),
            sources=torch.zeros(n, 3, 2, 2),
            group=group,
            instructions=["x"] * n,
            item_ids=list(item_ids),
        )

    return make
