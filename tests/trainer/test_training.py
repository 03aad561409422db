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

# The learning check: tiny model, brightness reward, CPU. Same sizes for both objectives.
LEARNING = [
    "run.num_epochs=12",
    "run.image_log_freq=0",
    "sample.batch_size=8",
    "sample.nb_gen=2",
    "train.batch_size=8",
    "train.learning_rate=1e-2",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "objective,extra",
    [("ppo", ["train.clip_range=10"]), ("spie_ranking", [])],
)
def test_brightness_is_learned(tiny_config, objective, extra):
    """Mean reward over the last 3 epochs beats epoch 0 by more than 3 standard errors."""
    config = tiny_config(*LEARNING, f"train.objective={objective}", *extra, f"run.name=learn-{objective}")
    metrics = read_metrics(train(config))
    means = np.array([m["brightness.mean"] for m in metrics])
    stds = np.array([m["brightness.std"] for m in metrics])
    n = config.images_per_epoch
    last = means[-3:].mean()
    # Standard error of the difference: epoch 0's n edits against the last 3 epochs' 3n edits.
    se = math.sqrt(stds[0] ** 2 / n + (stds[-3:] ** 2).mean() / (3 * n))
    print(objective, np.round(means, 4).tolist(), f"gain = {(last - means[0]) / se:.1f} SE")
    assert last - means[0] > 3 * se, (means.tolist(), se)
    assert all(m["nonfinite_skipped"] == 0 for m in metrics)


def test_resume_gives_the_same_weights_as_a_straight_run(tiny_config):
    straight = train(tiny_config("run.num_epochs=4", "run.name=straight", "run.image_log_freq=0"))
    first = train(tiny_config("run.num_epochs=2", "run.name=split", "run.image_log_freq=0"))
    assert [p.name for p in list_checkpoints(first)] == ["epoch_0000", "epoch_0001"]
    resumed = train(tiny_config("run.num_epochs=4", "run.name=split", "run.image_log_freq=0"), resume=first)
    a = load_file(str(list_checkpoints(straight)[-1] / "trainable.safetensors"))
    b = load_file(str(list_checkpoints(resumed)[-1] / "trainable.safetensors"))
    assert a.keys() == b.keys() and any("lora" in k for k in a)
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
    assert "images per epoch = 8, effective train batch = 4, gradient updates per epoch = 2" in out
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
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["epoch_0000.png", "epoch_0001.png"]
    assert Image.open(run_dir / "samples" / "epoch_0000.png").size == (3 * 32, 4 * 32)
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
    assert Image.open(outs[0]).size == (32, 32)
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
    assert metrics["nonfinite_skipped"] == 2 * learner.steps_per_trajectory  # 2 micro-batches x steps
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

    config = tiny_config("run.name=skip", "train.skip_final_steps=2")
    learner = Learner(config, build_policy(config))
    stochastic = learner.policy.sched.step_is_stochastic()
    steps = torch.nonzero(stochastic).view(-1)
    assert learner.steps_per_trajectory == len(steps) - 2
    rollout = SimpleNamespace(stochastic=stochastic, group=torch.tensor([0, 0, 1, 1]))
    plan = learner._timestep_plan(rollout, torch.Generator().manual_seed(0))
    assert set(plan.view(-1).tolist()) == set(steps[:-2].tolist())
