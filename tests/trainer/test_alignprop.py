"""AlignProp (train.objective=alignprop): truncation, the reference formulas, refusal, learning, resume."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from trainer.algo.alignprop import backprop_steps, reward_loss
from trainer.errors import UserError
from trainer.loop import train
from trainer.run.checkpoint import list_checkpoints
from trainer.run.log import read_metrics

ALIGNPROP = ["train.objective=alignprop", "run.image_log_freq=0", "train.backprop_max_steps=0"]


def _policy_and_shard(tiny_config, *overrides):
    from trainer.data.inputs import load_inputs
    from trainer.engine.policy import build_policy, trainable_parameters
    from trainer.engine.shards import epoch_generator, latent_shape, plan_epoch

    config = tiny_config(*ALIGNPROP, "sample.batch_size=4", *overrides)
    policy = build_policy(config)
    params = trainable_parameters(policy, config.model.use_lora)
    inputs = load_inputs(config.data, config.model.resolution, seed=0)
    shard = plan_epoch(
        inputs, config, 0, epoch_generator(0, 0), latent_shape(policy, config.model.resolution)
    )[0]
    return config, policy, params, shard


@pytest.mark.parametrize("checkpointing", [True, False])
def test_truncation_k1_and_k_all_give_the_expected_graph_lengths(tiny_config, checkpointing):
    """K=1 runs one UNet call with a graph and T-1 without; K=T runs all T with one. Both reach the
    weights, and the longer graph gives another gradient."""
    from sampler.differentiable import sample_with_grad

    config, policy, params, shard = _policy_and_shard(tiny_config, "sample.num_steps=4")
    calls: list[bool] = []
    policy.unet.register_forward_hook(lambda m, i, o: calls.append(o.sample.requires_grad))
    grads = {}
    for k in (1, 4):
        calls.clear()
        gen = torch.Generator()
        gen.set_state(shard.noise_state)
        s = sample_with_grad(
            policy, shard.inputs.sources, shard.inputs.instructions, k, nb_gen=2, generator=gen,
            shared_noise=True, gradient_checkpointing=checkpointing,
        )  # fmt: skip
        assert calls == [False] * (4 - k) + [True] * k
        for p in params.values():
            p.grad = None
        s.images.mean().backward()
        grads[k] = torch.cat([p.grad.flatten() for p in params.values()])
        assert grads[k].abs().sum() > 0
    assert not torch.allclose(grads[1], grads[4])


def test_the_edits_equal_the_rollout_s_on_the_same_noise(tiny_config):
    """sample_with_grad draws its noise as EditPolicy.rollout does: a planned shard gives the same edits."""
    from sampler.differentiable import sample_with_grad
    from trainer.engine.shards import sample_shard

    config, policy, _, shard = _policy_and_shard(tiny_config)
    gen = torch.Generator()
    gen.set_state(shard.noise_state)
    s = sample_with_grad(
        policy, shard.inputs.sources, shard.inputs.instructions, 2, nb_gen=2, generator=gen, shared_noise=True
    )
    assert torch.allclose(s.images.detach(), sample_shard(policy, shard, config, False).images, atol=1e-6)


def test_k_draws_and_loss_match_alignprop_s_formulas():
    """K's range and uniformity against `mihirp1998/AlignProp` sd_pipeline.py `pipeline_step_with_grad`
    (commit b576ae7, lines 95-103): `backprop_timestep = int(torch.randint(min, max, (1,)))`, redrawn
    while outside [1, T), then `if i < backprop_timestep: noise_pred = noise_pred.detach()`, so K =
    T - backprop_timestep. And the loss of `aesthetic_loss_fn` (alignprop_trainer.py): `loss = -1 *
    rewards`, then `loss.mean()` (grad_scale 1)."""
    T, lo, hi = 10, 3, 7
    gen, ref = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)

    def upstream_k() -> int:
        cut = -1
        while cut >= T or cut < 1:
            cut = int(torch.randint(T - hi, T - lo + 1, (1,), generator=ref).item())
        return T - cut

    ours = torch.tensor([backprop_steps(lo, hi, T, gen) for _ in range(4000)])
    theirs = torch.tensor([upstream_k() for _ in range(4000)])
    assert set(ours.tolist()) == set(theirs.tolist()) == set(range(lo, hi + 1))
    for k in range(lo, hi + 1):  # both uniform: 800 expected, sd 25
        assert abs(int((ours == k).sum()) - 800) < 125 and abs(int((theirs == k).sum()) - 800) < 125
    assert backprop_steps(1, 0, T, gen) in range(1, T + 1) and backprop_steps(2, 2, T, gen) == 2
    with pytest.raises(ValueError, match="not within"):
        backprop_steps(0, 3, T, gen)
    rewards = {"a": torch.tensor([0.2, 0.6]), "b": torch.tensor([1.0, 3.0])}
    loss, total = reward_loss(rewards, {"a": 1.0, "b": 0.5})
    assert torch.allclose(total, torch.tensor([0.7, 2.1]))
    assert math.isclose(float(loss), float((-1 * total).mean()), rel_tol=1e-7)


def test_a_non_differentiable_scorer_is_refused_naming_it(tiny_config):
    config = tiny_config(
        *ALIGNPROP, "reward.scorers=[{name: brightness}, {name: jpeg_compressibility}]", "run.name=refused"
    )
    with pytest.raises(UserError, match=r"jpeg_compressibility has no differentiable form"):
        train(config)
    with pytest.raises(UserError, match="backprop_min_steps"):
        tiny_config(*ALIGNPROP, "train.backprop_min_steps=5")


# The learning check: the tiny preset (8 px, 3 DDIM steps, whole UNet, lr 1e-3), brightness, K drawn
# from all 3 steps, one step of 32 edits (16 inputs x 2) per epoch, 2 epochs; evaluated paired (same
# inputs and noise) on 32 edits. Measured: +0.126, +0.099, +0.159 (14, 13, 19 standard errors) on seeds
# 0, 1, 2, about 2 s each (4 epochs of 64 edits: +0.156, +0.119, +0.197).
LEARNING = [
    *ALIGNPROP,
    "train.backprop_min_steps=1",
    "run.num_epochs=2",
    "sample.batch_size=16",
    "run.save_freq=100",
]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_brightness_is_learned(tiny_config, tmp_path, seed, brightness_gain_over_base):
    run_dir = train(tiny_config(*LEARNING, f"run.seed={seed}", f"run.name=alignprop-{seed}"))
    metrics = read_metrics(run_dir)
    assert all(m["nonfinite_skipped"] == 0 for m in metrics)
    brightness_gain_over_base("tiny", run_dir, tmp_path, seed, "alignprop", num_items=32, floor=0.02)


def test_resume_gives_the_same_weights_as_a_straight_run(tiny_config):
    """2 + 2 epochs equal 4 epochs bit for bit (K is drawn from the epoch generator)."""
    base = [*ALIGNPROP, "train.backprop_min_steps=1", "sample.batch_size=8", "sample.num_batches_per_epoch=2"]
    straight = train(tiny_config(*base, "run.num_epochs=4", "run.name=straight"))
    first = train(tiny_config(*base, "run.num_epochs=2", "run.name=split"))
    resumed = train(tiny_config(*base, "run.num_epochs=4", "run.name=split"), resume=first)
    a = load_file(str(list_checkpoints(straight)[-1] / "trainable.safetensors"))
    b = load_file(str(list_checkpoints(resumed)[-1] / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ma, mb = read_metrics(straight), read_metrics(resumed)
    assert [m["backprop_steps"] for m in ma] == [m["backprop_steps"] for m in mb]
    assert [m["brightness.mean"] for m in ma] == [m["brightness.mean"] for m in mb]


def test_paper_preset_has_alignprop_s_settings():
    from trainer.config import load_config

    c = load_config("configs/alignprop-a100.yaml")
    assert c.train.objective == "alignprop" and c.sample.num_steps == 50 and c.sample.guidance_scale == 7.5
    assert (c.train.learning_rate, c.train.adam_weight_decay, c.train.max_grad_norm) == (1e-3, 0.1, 5.0)
    assert (c.train.backprop_min_steps, c.train.backprop_max_steps) == (1, 0)  # minmax (0, 50): K in 1-50
    assert c.sample.batch_size * c.sample.num_batches_per_epoch == 256  # samples per epoch
    assert c.sample.batch_size * c.train.gradient_accumulation_steps == 128  # total batch size
    assert c.model.use_lora and c.train.gradient_checkpointing and not c.ray.enabled
    # AlignProp's loss 0.01 x (1 - cos): our hpsv2 is 100 x cos, so weight 0.01 and loss_coeff 0.01.
    assert [(s.name, s.weight) for s in c.reward.scorers] == [("hpsv2", 0.01)]
    assert c.train.alignprop_loss_coeff == 0.01
