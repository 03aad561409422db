"""The whole single-process loop: learning on a real reward, exact resume, generation, outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sampler.rollout import Rollout
from trainer.loop import train
from trainer.run.checkpoint import list_checkpoints
from trainer.run.log import read_metrics

# The learning checks: tiny model, brightness reward, CPU, the preset's own sizes (configs/tiny.yaml)
# with 4 sampling batches (256 edits, 4 updates) per epoch, 8 epochs. No seed is pinned: each runs on seeds 0-2.
LEARNING = [
    "run.num_epochs=8",
    "run.image_log_freq=0",
    "run.save_freq=100",
    "run.checkpoint_limit=1",
    "sample.num_batches_per_epoch=4",
]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("objective", ["ppo", "spie_ranking"])
def test_brightness_is_learned(tiny_config, tmp_path, objective, seed, brightness_gain_over_base):
    """The trained policy beats the base model on the same 64 inputs and the same noise: the mean
    paired brightness difference exceeds 0.01 and 4 standard errors."""
    config = tiny_config(
        *LEARNING, f"train.objective={objective}", f"run.seed={seed}", f"run.name=learn-{objective}"
    )
    run_dir = train(config)
    metrics = read_metrics(run_dir)
    assert all(m["nonfinite_skipped"] == 0 for m in metrics)
    brightness_gain_over_base("tiny", run_dir, tmp_path, seed, objective)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_batch_update_favours_the_better_edits(tiny_config, seed):
    """End to end on one batch of 64 edits (32 inputs x 2): one small optimizer step raises the
    summed log-probability of the edits with higher advantages, and a PPO update on the batch (4
    passes of 4 steps at lr 3e-4) makes the edits sampled again from the same inputs and noise brighter."""
    from trainer.algo.objectives import group_advantages
    from trainer.data.inputs import load_inputs
    from trainer.engine.learner import Learner
    from trainer.engine.policy import build_policy
    from trainer.engine.shards import epoch_generator, latent_shape, plan_epoch, sample_shard

    config = tiny_config(f"run.seed={seed}", "run.name=one-batch", "train.learning_rate=1e-5")
    policy = build_policy(config)
    inputs = load_inputs(config.data, config.model.resolution, seed=seed)
    shard = plan_epoch(
        inputs, config, 0, epoch_generator(seed, 0), latent_shape(policy, config.model.resolution)
    )[0]
    rollout = sample_shard(policy, shard, config, False)
    brightness = rollout.images.mean(dim=(1, 2, 3)).double()
    rollout.advantages = group_advantages(brightness, rollout.group).float()
    adv = rollout.advantages
    steps = torch.nonzero(rollout.stochastic).view(-1).tolist()

    # One optimizer step (the whole batch), small enough to stay first order.
    Learner(config, policy).train(rollout, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        change = sum(policy.step_log_prob(rollout, j) for j in steps) - rollout.log_probs[:, steps].sum(1)
    corr = float(np.corrcoef(adv.numpy(), change.numpy())[0, 1])

    # A PPO update: 4 passes over the batch in micro-batches of 16 (16 steps) at lr 3e-4.
    update = tiny_config(
        f"run.seed={seed}", "train.batch_size=16", "train.num_inner_epochs=4", "train.learning_rate=3e-4"
    )
    Learner(update, policy).train(rollout, torch.Generator().manual_seed(seed))
    again = sample_shard(policy, shard, config, False)  # the same inputs and the same noise
    gain = again.images.mean(dim=(1, 2, 3)).double() - brightness
    se = float(gain.std()) / math.sqrt(len(gain))
    print(
        seed,
        f"corr(advantage, log-prob change) {corr:.2f}; paired gain {gain.mean():+.4f} = {gain.mean() / se:.1f} SE",
    )
    assert corr > 0.5
    assert gain.mean() > 3 * se


def test_resume_gives_the_same_weights_as_a_straight_run(tiny_config):
    straight = train(tiny_config("run.num_epochs=4", "run.name=straight", "run.image_log_freq=0"))
    first = train(tiny_config("run.num_epochs=2", "run.name=split", "run.image_log_freq=0"))
    assert [p.name for p in list_checkpoints(first)] == ["epoch_0000", "epoch_0001"]
    resumed = train(tiny_config("run.num_epochs=4", "run.name=split", "run.image_log_freq=0"), resume=first)
    a = load_file(str(list_checkpoints(straight)[-1] / "trainable.safetensors"))
    b = load_file(str(list_checkpoints(resumed)[-1] / "trainable.safetensors"))
    assert a.keys() == b.keys() and "unet.conv_out.bias" in a  # the preset trains the whole UNet
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The resumed run's metrics carry on the straight run's, epoch for epoch.
    ma, mb = read_metrics(straight), read_metrics(resumed)
    assert [m["epoch"] for m in mb] == [0, 1, 2, 3]
    assert [m["brightness.mean"] for m in ma] == [m["brightness.mean"] for m in mb]


def test_run_outputs_and_generate(tiny_config, tmp_path, capsys):
    from trainer.cli import main

    config = tiny_config("run.num_epochs=2", "run.name=outputs", "run.checkpoint_limit=1")
    run_dir = train(config)
    out = capsys.readouterr().out
    assert "images per epoch = 64, effective train batch = 64, gradient updates per epoch = 1" in out
    metrics = read_metrics(run_dir)
    for key in (
        "epoch",
        "brightness.mean",
        "brightness.std",
        "loss",
        "approx_kl",
        "clipfrac",
        "samples_per_s",
        "time_sampling_s",
        "time_scoring_s",
        "time_training_s",
    ):
        assert key in metrics[0], key
    assert [p.name for p in list_checkpoints(run_dir)] == ["epoch_0001"]  # checkpoint_limit=1
    samples = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert samples == ["epoch_0000.jsonl", "epoch_0000.png", "epoch_0001.jsonl", "epoch_0001.png"]
    # A row per input (at most 8 of the 32), a column for the source and each of its 2 edits, 8 px each.
    assert Image.open(run_dir / "samples" / "epoch_0000.png").size == (3 * 8, 8 * 8)
    notes = [json.loads(x) for x in (run_dir / "samples" / "epoch_0000.jsonl").read_text().splitlines()]
    assert len(notes) == 8 * 2 and all(set(n["scores"]) == {"brightness"} for n in notes)
    assert any((run_dir / "tensorboard").iterdir())

    images = tmp_path / "in"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 48, 3), 60 * i, np.uint8)).save(images / f"img{i}.png")
    code = main(
        [
            "generate",
            "--checkpoint",
            str(run_dir),
            "--images",
            str(images),
            "--instruction",
            "make it brighter",
            "--out",
            str(tmp_path / "out"),
            "--quiet",
        ]
    )
    assert code == 0
    outs = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in outs] == ["img0.png", "img1.png", "img2.png"]
    assert Image.open(outs[0]).size == (8, 8)
    # A fresh run into a folder that already holds one is refused (no work is overwritten).
    code = main(
        [
            "train",
            "--config",
            "configs/tiny.yaml",
            "--set",
            f"run.output_dir={run_dir.parent}",
            "--set",
            "run.name=outputs",
            "--quiet",
        ]
    )
    assert code == 2
    assert "already holds a run" in capsys.readouterr().err
    json.dumps(metrics)  # metrics are plain JSON


def test_a_non_finite_loss_is_skipped_and_counted(tiny_config):
    """NaN advantages make every loss non-finite: no update happens, the weights stay, the count says so."""
    from trainer.data.inputs import load_inputs
    from trainer.engine.learner import Learner
    from trainer.engine.policy import build_policy
    from trainer.engine.shards import epoch_generator, latent_shape, plan_epoch, sample_shard

    config = tiny_config("run.name=nan")
    policy = build_policy(config)
    learner = Learner(config, policy)
    before = learner.trainable_state()
    inputs = load_inputs(config.data, config.model.resolution)
    shards = plan_epoch(
        inputs, config, 0, epoch_generator(0, 0), latent_shape(policy, config.model.resolution)
    )
    rollout = Rollout.concat([sample_shard(policy, sh, config, False) for sh in shards])
    rollout.advantages = torch.full((len(rollout),), float("nan"))
    metrics = learner.train(rollout, torch.Generator().manual_seed(0))
    assert metrics["nonfinite_skipped"] == learner.steps_per_trajectory  # 1 micro-batch x steps
    after = learner.trainable_state()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # A finite batch afterwards trains normally.
    rollout.advantages = torch.linspace(-1, 1, len(rollout))
    learner.train(rollout, torch.Generator().manual_seed(0))
    assert any(not torch.equal(before[k], learner.trainable_state()[k]) for k in before)


def test_skip_final_steps_leaves_the_last_stochastic_steps_out_of_training(tiny_config):
    from types import SimpleNamespace

    from trainer.engine.learner import Learner
    from trainer.engine.policy import build_policy

    config = tiny_config("run.name=skip", "train.skip_final_steps=2", previous=True)
    learner = Learner(config, build_policy(config))
    stochastic = learner.policy.sched.step_is_stochastic()
    steps = torch.nonzero(stochastic).view(-1)
    assert learner.steps_per_trajectory == len(steps) - 2
    rollout = SimpleNamespace(stochastic=stochastic, group=torch.tensor([0, 0, 1, 1]))
    plan = learner._timestep_plan(rollout, torch.Generator().manual_seed(0))
    assert set(plan.view(-1).tolist()) == set(steps[:-2].tolist())
