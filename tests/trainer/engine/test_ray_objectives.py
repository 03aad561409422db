"""AlignProp and SPO on a real local Ray: the learner actor (AlignProp) and the rollout workers
(SPO) give the local engine's results, bit for bit, on the same seed."""

from __future__ import annotations

import contextlib

import pytest
import ray
import torch

from trainer.data.inputs import load_inputs
from trainer.engine.local import LocalEngine
from trainer.engine.shards import epoch_generator, plan_epoch


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@contextlib.contextmanager
def one_thread():
    """Torch on one thread in this process, as in the actors (`ray.num_cpus_per_learner: 1`): the
    same float sums in the same order, so the engines can be compared bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_epochs(engine, config, epochs: int, step) -> list:
    """`step(engine, shards, generator)` on each epoch's shards, as `trainer.loop.train` plans them."""
    inputs = load_inputs(config.data, config.model.resolution, seed=config.run.seed)
    out = []
    for epoch in range(epochs):
        gen = epoch_generator(config.run.seed, epoch)
        shards = plan_epoch(inputs, config, epoch, gen, engine.latent_shape)
        out.append(step(engine, shards, gen))
    return out


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def on_both_engines(config, epochs: int, step):
    """(local results, local weights, Ray results, Ray weights) of `epochs` epochs of `step`."""
    from trainer.engine.ray.engine import RayEngine

    with one_thread():
        local = LocalEngine(config)
        a = run_epochs(local, config, epochs, step)
        wa = local.checkpoint_state()[0]
    engine = RayEngine(config)
    try:
        b = run_epochs(engine, config, epochs, step)
        wb = engine.checkpoint_state()[0]
    finally:
        engine.close()
    return a, wa, b, wb


# 2 epochs of 2 sampling batches of 4 inputs x 2 edits; K drawn per shard from all 3 steps.
ALIGNPROP = [
    "train.objective=alignprop",
    "train.backprop_min_steps=1",
    "train.backprop_max_steps=0",
    "sample.batch_size=4",
    "sample.num_batches_per_epoch=2",
    "ray.enabled=true",
]


def test_alignprop_on_one_ray_learner_equals_the_local_engine(local_ray, tiny_config):
    """The learner actor builds its own differentiable reward from the config (the driver's reward
    object never travels, only its spec) and trains exactly as the local engine."""
    from trainer.rewards.differentiable import make_gradient_rewards
    from trainer.rewards.inprocess import InProcessRewards

    config = tiny_config(*ALIGNPROP)
    reward = make_gradient_rewards(InProcessRewards(config.reward))
    assert reward.spec == {"transport": "inprocess"}
    a, wa, b, wb = on_both_engines(
        config, 2, lambda engine, shards, gen: engine.learn_by_reward(shards, reward, gen, False)
    )
    for (ra, sa, ma), (rb, sb, mb) in zip(a, b, strict=True):
        assert ra.item_ids == rb.item_ids and len(ra) == 16
        assert torch.equal(ra.images, rb.images)
        assert sa.values["brightness"].tolist() == sb.values["brightness"].tolist()
        assert ma == mb  # loss, reward, K per shard (drawn on the driver), nonfinite_skipped
    assert a[0][2]["loss"] != a[1][2]["loss"]  # the weights moved
    assert_same_weights(wa, wb)


def test_alignprop_on_two_ray_learners_equals_one_process(local_ray, tiny_config):
    """4 shards per epoch and one optimizer step: in one process 4 accumulated backward passes; on 2
    learners 2 each, their gradients averaged by the all-reduce. The same sum in another order: the
    same edits, K, losses and weights to float rounding."""
    from trainer.engine.ray.engine import RayEngine
    from trainer.rewards.differentiable import make_gradient_rewards
    from trainer.rewards.inprocess import InProcessRewards

    one = tiny_config(
        *ALIGNPROP,
        "ray.enabled=false",
        "sample.num_batches_per_epoch=4",
        "train.gradient_accumulation_steps=4",
    )
    two = tiny_config(*ALIGNPROP, "ray.num_learners=2", "train.gradient_accumulation_steps=2")
    assert one.batches_per_epoch == two.batches_per_epoch == 4
    reward = make_gradient_rewards(InProcessRewards(one.reward))

    def step(engine, shards, gen):
        return engine.learn_by_reward(shards, reward, gen, False)

    with one_thread():
        local = LocalEngine(one)
        a, wa = run_epochs(local, one, 2, step), local.checkpoint_state()[0]
    engine = RayEngine(two)
    try:
        b, wb = run_epochs(engine, two, 2, step), engine.checkpoint_state()[0]
    finally:
        engine.close()
    for (ra, _, ma), (rb, _, mb) in zip(a, b, strict=True):
        assert ra.item_ids == rb.item_ids and len(ra) == 32
        torch.testing.assert_close(ra.images, rb.images, atol=1e-5, rtol=0)
        assert ma["backprop_steps"] == mb["backprop_steps"]
        assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-6)
    assert a[0][2]["loss"] != a[1][2]["loss"]
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=1e-5)


# SPO on the tiny editor (3 DDIM steps, pools at both stochastic steps), brightness scaled to SPO's
# threshold as in tests/trainer/test_spo_training.py; 2 epochs of 2 shards of 4 inputs.
SPO = [
    "train.objective=spo",
    "sample.nb_gen=1",
    "train.spo.start_step=0",
    "reward.scorers=[{name: brightness, weight: 100}]",
    "sample.batch_size=4",
    "sample.num_batches_per_epoch=2",
    "ray.enabled=true",
    "ray.num_rollout_workers=2",
]


def test_spo_on_ray_workers_equals_the_local_engine(local_ray, tiny_config):
    """Pools sampled on 2 rollout workers (one shard each), judged on the driver, pairs trained by
    the learner actor: the local engine's pairs (ids, latents, log-probs, ranks) and losses, and
    its weights after 2 epochs."""
    from trainer.rewards.inprocess import InProcessRewards
    from trainer.stepwise import sample_spo

    config = tiny_config(*SPO)
    rewards = InProcessRewards(config.reward)

    def step(engine, shards, gen):
        _, scores, pairs, info = sample_spo(engine, rewards, shards, config, False)
        return scores, pairs, info, engine.learn(pairs, gen, False)

    a, wa, b, wb = on_both_engines(config, 2, step)
    for (sa, pa, ia, la), (sb, pb, ib, lb) in zip(a, b, strict=True):
        assert ia["spo.pairs"] == ib["spo.pairs"] > 0 and ib["spo.judged"] == 2 * 2 * 4 * 4
        assert pa.item_ids == pb.item_ids
        for field in ("latents", "log_probs", "ranks", "step_index"):
            assert torch.equal(getattr(pa, field), getattr(pb, field)), field
        assert sa.values["brightness"].tolist() == sb.values["brightness"].tolist()
        assert la["loss"] == lb["loss"]
    assert a[0][3]["loss"] != a[1][3]["loss"]
    assert_same_weights(wa, wb)
