"""The Ray engine on a real local Ray: same metrics as the single-process loop, weight sync and
staleness in the metrics, and a killed rollout worker whose share is sampled again."""

from __future__ import annotations

import pytest
import ray
import torch

from trainer.engine.shards import epoch_generator, plan_epoch
from trainer.loop import train
from trainer.run.log import read_metrics

# Two sampling batches per epoch, so two workers each get one.
COMMON = ["run.num_epochs=2", "run.image_log_freq=0", "sample.num_batches_per_epoch=2"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_run_reproduces_the_single_process_run(local_ray, tiny_config, capsys):
    local = read_metrics(train(tiny_config(*COMMON, "run.name=local", previous=True)))
    one = read_metrics(train(tiny_config(*COMMON, "run.name=ray1", "ray.enabled=true", previous=True)))
    two_dir = train(
        tiny_config(*COMMON, "run.name=ray2", "ray.enabled=true", "ray.num_rollout_workers=2", previous=True)
    )
    assert "ray: 2 rollout worker(s) on 1 node(s), 1 learner" in capsys.readouterr().out
    two = read_metrics(two_dir)
    # Each shard carries where its noise starts in the epoch's stream, so the edits do not depend on
    # the number of workers; the remaining differences are float rounding (actors run torch on 1 thread, this process on more).
    for a, b, c in zip(local, one, two, strict=True):
        for key in ("brightness.mean", "brightness.std", "loss", "approx_kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-9), key
            assert c[key] == pytest.approx(a[key], rel=1e-4, abs=1e-9), key
        assert b["items"] == c["items"] == 16 and c["items_dropped"] == 0
        assert c["rollout_staleness"] == 0 and c["rollout_workers"] == 2
        assert c["time_weight_sync_s"] > 0
    assert [m["policy_version"] for m in two] == [0, 1]
    # The checkpoint holds the learner actor's trained weights.
    assert (two_dir / "checkpoints" / "epoch_0001" / "trainable.safetensors").is_file()


def test_a_killed_rollout_worker_is_restarted_and_its_share_redone(local_ray, tiny_config):
    from trainer.data.inputs import load_inputs
    from trainer.engine.ray.engine import RayEngine

    config = tiny_config(
        *COMMON, "ray.enabled=true", "ray.num_rollout_workers=2", "ray.max_restarts=2", previous=True
    )
    inputs = load_inputs(config.data, config.model.resolution, seed=config.run.seed)
    engine = RayEngine(config)
    try:
        shards = plan_epoch(inputs, config, 0, epoch_generator(config.run.seed, 0), engine.latent_shape)
        pool = engine.pool
        before = pool.placement[0]["pid"]
        clean = pool.sample(shards)
        # Kill worker 0 while its share is in flight: Ray restarts it, the pool sends it the
        # current weights and samples its share again; the batch comes back whole and identical.
        job = pool.submit(shards)
        ray.kill(pool.workers[0], no_restart=False)
        redone = pool.gather(job)
        assert pool.restarts == 1
        assert len(redone) == len(clean) == 16
        assert redone.item_ids == clean.item_ids
        assert torch.allclose(redone.images, clean.images, atol=1e-6)
        assert torch.equal(redone.group, clean.group) and redone.policy_version == engine.version
        after = ray.get(pool.workers[0].ready.remote(), timeout=120)["pid"]
        assert after != before  # a new process
        # A worker that cannot come back stops the epoch with an error: no partial batch.
        job = pool.submit(shards)
        ray.kill(pool.workers[1], no_restart=True)
        with pytest.raises(RuntimeError, match="not training on a partial batch"):
            pool.gather(job)
    finally:
        engine.close()
