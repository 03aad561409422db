"""`sample.pipeline`: scoring overlapped with sampling gives the synchronous run's numbers; a scoring
error stops the run as it does in sync; a scorer that does not answer hits the loop's deadline."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from trainer.loop import train
from trainer.run.checkpoint import list_checkpoints
from trainer.run.log import read_metrics

# Three sampling batches per epoch, so each epoch has three scoring calls to overlap.
COMMON = ["run.num_epochs=2", "run.image_log_freq=0", "sample.num_batches_per_epoch=3", "sample.batch_size=2"]


def test_async_pipeline_gives_the_sync_numbers(tiny_config):
    sync_dir = train(tiny_config(*COMMON, "run.name=sync", "sample.pipeline=sync", previous=True))
    async_dir = train(tiny_config(*COMMON, "run.name=async", "sample.pipeline=async", previous=True))
    sync, overlapped = read_metrics(sync_dir), read_metrics(async_dir)
    assert len(sync) == len(overlapped) == 2
    for a, b in zip(sync, overlapped, strict=True):
        # Same shards, same noise, scores gathered back in shard order: identical, not merely close.
        for key in ("brightness.mean", "brightness.std", "loss", "approx_kl", "clipfrac", "items"):
            assert a[key] == b[key], key
        assert a["time_overlap_s"] == 0.0 and b["time_overlap_s"] >= 0.0
        for m in (a, b):
            assert m["time_sample_score_s"] <= m["time_epoch_s"]
            assert m["time_sampling_s"] > 0 and m["time_scoring_s"] > 0 and m["time_scoring_wait_s"] >= 0
    wa = load_file(str(list_checkpoints(sync_dir)[-1] / "trainable.safetensors"))
    wb = load_file(str(list_checkpoints(async_dir)[-1] / "trainable.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# The `sleep` scorer raises on an item whose instruction is its `poison`.
POISON = ["data.instructions=[__poison__]", "reward.scorers=[{name: sleep, kwargs: {batch_seconds: 0}}]"]


@pytest.mark.parametrize("pipeline", ["sync", "async"])
def test_a_scoring_error_stops_the_run_in_both_modes(tiny_config, pipeline):
    config = tiny_config(
        *COMMON, *POISON, f"run.name=poison-{pipeline}", f"sample.pipeline={pipeline}", previous=True
    )
    with pytest.raises(RuntimeError, match="sleep: poison item"):
        train(config)


def test_scores_that_never_come_stop_the_run_at_the_deadline(tiny_config):
    config = tiny_config(
        *COMMON,
        "run.name=slow-scorer",
        "reward.scorers=[{name: sleep, kwargs: {batch_seconds: 2.0}}]",
        "reward.deadline_s=0.2",
        previous=True,
    )
    with pytest.raises(RuntimeError, match=r"gave no result within 0.5s \(2.5 x reward.deadline_s=0.2\)"):
        train(config)


def test_merge_scores_keeps_item_order_and_fills_missing_details():
    import numpy as np

    from trainer.pipeline import merge_scores
    from trainer.rewards.scores import Scores

    a = Scores({"s": np.array([1.0, 2.0])}, {"s": [None, "bad"]}, {"s.hit": np.array([1.0, 0.0])})
    b = Scores({"s": np.array([3.0])}, {"s": [None]}, {})
    m = merge_scores([a, b])
    assert m.values["s"].tolist() == [1.0, 2.0, 3.0] and m.errors["s"] == [None, "bad", None]
    assert m.details["s.hit"][:2].tolist() == [1.0, 0.0] and np.isnan(m.details["s.hit"][2])
