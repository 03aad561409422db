"""What each epoch shows a user: the held-out probe under fixed noise, the ranking diagnostics, the
zero-variance groups, and Edit-R1's group filter."""

from __future__ import annotations

import math

import torch

from trainer.algo.diagnostics import ranking_diagnostics
from trainer.loop import train
from trainer.run.log import read_metrics


def test_ranking_diagnostics_against_their_definitions():
    log_prob = torch.tensor([0.3, 0.1, -0.2, 0.0, 0.05, 0.05])
    ref = torch.zeros(6)
    ranking = torch.tensor([[0, 1, 2], [3, 4, 5]])  # group 0 agrees with the policy; group 1 does not
    d = ranking_diagnostics(log_prob, ref, ranking, eps=0.1)
    # Outside [log 0.9, log 1.1] = [-0.1054, 0.0953]: 0.3, 0.1 and -0.2.
    assert math.isclose(float(d["clamped_frac"]), 3 / 6)
    assert math.isclose(float(d["abs_log_ratio"]), (0.3 + 0.1 + 0.2 + 0.0 + 0.05 + 0.05) / 6, rel_tol=1e-6)
    # Group 0: 3 pairs agree. Group 1: (3, 4) and (3, 5) disagree, (4, 5) is a tie (one half).
    assert math.isclose(float(d["pref_agreement"]), (3 + 0.5) / 6)


def test_the_probe_moves_only_with_the_policy(tiny_config):
    """With a learning rate of 1e-30 the weights do not change in float32, so the probe (fixed
    inputs, fixed noise) scores the same before training and after every epoch, while the training
    batches differ."""
    config = tiny_config(
        "run.num_epochs=2",
        "run.name=probe",
        "train.learning_rate=1e-30",
        "train.objective=spie_ranking",
        "eval.probe_every=1",
        "eval.probe_items=4",
        previous=True,
    )
    records = read_metrics(train(config))
    probes = [r["probe.brightness.mean"] for r in records]
    assert records[0]["initial_probe.brightness.mean"] == probes[0] == probes[1]
    assert records[0]["brightness.mean"] != records[1]["brightness.mean"]
    for r in records:
        assert 0 <= r["pref_agreement"] <= 1 and r["clamped_frac"] == 0 and r["groups_zero_var"] == 0


def test_group_filter_drops_groups_and_counts_them(tiny_config):
    config = tiny_config("run.num_epochs=1", "run.name=filter", "train.filter_max_mean=-1", previous=True)
    (record,) = read_metrics(train(config))
    assert record["groups_filtered"] == 4  # every group: brightness is never below -1
    assert "loss" not in record  # nothing left to train on, and the run goes on
