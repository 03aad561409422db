"""SPO end to end: it learns on the tiny editor (seeds 0-2), its judge goes through the queue to a real
replica exactly as in process (the step index travelling in the metadata), its settings are checked."""

from __future__ import annotations

import pytest
import torch

from trainer.config import load_config, with_overrides
from trainer.engine.local import LocalEngine
from trainer.engine.shards import epoch_generator, plan_epoch
from trainer.errors import UserError
from trainer.loop import train
from trainer.rewards.inprocess import InProcessRewards
from trainer.rewards.queue import QueueClientConfig, RewardClient
from trainer.run.log import read_metrics
from trainer.stepwise import sample_spo

# The tiny preset (3 DDIM steps, 2 of them stochastic) with SPO's pools at both stochastic steps.
# Brightness lies in [0, 1]: weight 100 puts its gaps (about 0.01-0.05) on the scale of SPO's
# threshold 0.3 (a preference-model logit), which then keeps the pools with a gap above 0.006.
SPO = [
    "train.objective=spo",
    "sample.nb_gen=1",
    "train.spo.start_step=0",
    "reward.scorers=[{name: brightness, weight: 100}]",
    "run.image_log_freq=0",
    "run.save_freq=100",
    "run.checkpoint_limit=1",
]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spo_learns_brightness(tiny_config, tmp_path, seed, brightness_gain_over_base):
    """4 SPO epochs of 32 inputs: on 64 held-out draws (same inputs and noise for both models) the
    trained editor's edits are brighter than the base model's by more than 0.01 and 4 standard errors."""
    run_dir = train(tiny_config(*SPO, "run.num_epochs=2", f"run.seed={seed}", "run.name=spo"))
    metrics = read_metrics(run_dir)
    assert all(m["nonfinite_skipped"] == 0 and m["spo.pairs"] > 0 for m in metrics)
    brightness_gain_over_base("tiny", run_dir, tmp_path, seed, "spo")


def test_the_queue_judge_gives_the_in_process_pairs(tiny_config, redis_server, replicas):
    """The same SPO epoch judged by a `sleep` replica over Redis (asynchronously, while the chains go
    on; 0.5 s per call, so the steps decoded meanwhile go together in the next call) and by the same
    scorer in process (step by step): the same pairs, the same final scores; the replica saw each
    candidate's step index in its metadata."""
    replicas(scorer="sleep", scorer_kwargs={"batch_seconds": 0.5, "max_batch_size": 128})
    config = tiny_config(
        *SPO,
        "reward.scorers=[{name: sleep, weight: 100, kwargs: {batch_seconds: 0.0}}]",
        "sample.batch_size=8",
        "sample.num_batches_per_epoch=2",
    )
    engine = LocalEngine(config)
    shards = plan_epoch(engine_inputs(config), config, 0, epoch_generator(0, 0), engine.latent_shape)
    local = InProcessRewards(config.reward)
    queue_config = QueueClientConfig(url=redis_server.url, deadline_s=30, resubmits=0, poll_s=0.05)
    client = RewardClient(["sleep"], queue_config, password=redis_server.password)
    sync = with_overrides(config, ["sample.pipeline=sync"])
    try:
        final_a, scores_a, pairs_a, info_a = sample_spo(engine, local, shards, sync, False)
        final_b, scores_b, pairs_b, info_b = sample_spo(engine, client, shards, config, False)
        seen = []
        engine.sample_pools(shards[0], seen.append, False)
        judged = client.score(seen[-1])
    finally:
        client.close()
    assert info_a["spo.pairs"] == info_b["spo.pairs"] > 0 and info_b["spo.judged"] == 2 * 2 * 8 * 4
    assert info_a["spo.judge_calls"] == 4 and info_b["spo.judge_calls"] < 4  # 2 shards x 2 steps
    assert pairs_a.item_ids == pairs_b.item_ids and torch.equal(pairs_a.latents, pairs_b.latents)
    assert pairs_a.ranks.tolist() == pairs_b.ranks.tolist()
    assert torch.equal(final_a.images, final_b.images)
    assert scores_a.values["sleep"].tolist() == pytest.approx(scores_b.values["sleep"].tolist(), abs=1e-12)
    step = seen[-1].metadata[0]["step"]
    assert step == 2 and judged.details["sleep.step"].tolist() == [step] * len(seen[-1])


def engine_inputs(config):
    from trainer.data.inputs import load_inputs

    return load_inputs(config.data, config.model.resolution, seed=config.run.seed)


@pytest.mark.parametrize(
    "override,field",
    [
        ("sample.nb_gen=2", "sample.nb_gen"),
        ("ray.num_learners=2", "ray.num_learners"),
        ("train.batch_size=63", "train.batch_size"),
        ("train.gradient_accumulation_steps=2", "train.gradient_accumulation_steps"),
        ("train.spo.pool_size=1", "train.spo.pool_size"),
        ("train.spo.start_step=3", "train.spo.start_step"),
        ("train.spo.threshold=1.0", "train.spo.threshold"),
        ("train.spo.pools=4", "train.spo.pools"),
    ],
)
def test_spo_settings_are_checked_with_one_line(override, field):
    with pytest.raises(UserError) as err:
        load_config("configs/tiny.yaml", [*SPO, override])
    message = str(err.value)
    assert field in message and "\n" not in message


def test_spo_resume_gives_the_same_weights_as_a_straight_run(tiny_config):
    """2 + 2 SPO epochs (stopped, resumed from the checkpoint) equal 4 straight epochs, bit for bit."""
    from safetensors.torch import load_file

    from trainer.run.checkpoint import list_checkpoints

    small = [*SPO, "sample.batch_size=8", "run.save_freq=1", "run.checkpoint_limit=2"]
    straight = train(tiny_config(*small, "run.num_epochs=4", "run.name=straight"))
    first = train(tiny_config(*small, "run.num_epochs=2", "run.name=split"))
    resumed = train(tiny_config(*small, "run.num_epochs=4", "run.name=split"), resume=first)
    a = load_file(str(list_checkpoints(straight)[-1] / "trainable.safetensors"))
    b = load_file(str(list_checkpoints(resumed)[-1] / "trainable.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    ma, mb = read_metrics(straight), read_metrics(resumed)
    assert [m["epoch"] for m in mb] == [0, 1, 2, 3]
    assert [(m["spo.pairs"], m["loss"]) for m in ma] == [(m["spo.pairs"], m["loss"]) for m in mb]
    assert ma[0]["loss"] != ma[3]["loss"]  # the weights did move
