"""SPO's pair selection and loss against SPO's own lines (RockeyCoss/SPO at commit 27a8642) on fixed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.algo.spo import judge_values, pair_batch, preference_pairs, spo_loss
from trainer.config import RewardConfig, ScorerConfig
from trainer.rewards.scores import Scores

# Fixed log-probs of 4 pairs (winner, loser): inside the clamp, past it on either side, and mixed.
LOG_PROB = [-1.20, -1.25, 0.40, 0.10, -2.0, -1.9, 0.03, -0.30]
REF_LOG_PROB = [-1.23, -1.20, 0.20, 0.15, -1.95, -2.05, 0.00, -0.25]


def upstream_loss(lp0, ref0, lp1, ref1, beta, eps):
    """spo_training_and_inference/train_scripts/train_spo.py, lines 584-586, reimplemented."""
    ratio_0 = torch.clamp(torch.exp(lp0 - ref0), 1 - eps, 1 + eps)
    ratio_1 = torch.clamp(torch.exp(lp1 - ref1), 1 - eps, 1 + eps)
    return -torch.log(torch.sigmoid(beta * (torch.log(ratio_0)) - beta * (torch.log(ratio_1)))).mean()


def upstream_compare(scores, threshold):
    """spo_training_and_inference/spo/preference_models/compare_funcs.py, lines 5-14, reimplemented:
    `scores` is (num_sample_per_step, b)."""
    scores, indices = torch.sort(scores, dim=0, descending=True)
    indices = indices[[0, -1], :]
    scores = scores[[0, -1], :]
    scores = scores.softmax(dim=0)
    valid_samples = scores[0] - scores[1] > threshold
    return indices, valid_samples


@pytest.mark.parametrize("beta,eps", [(10.0, 0.1), (1.0, 0.5)])
def test_loss_and_gradient_equal_spos_lines(beta, eps):
    ours_lp = torch.tensor(LOG_PROB, dtype=torch.float64, requires_grad=True)
    ref = torch.tensor(REF_LOG_PROB, dtype=torch.float64)
    pairs = torch.arange(8).view(4, 2)
    ours = spo_loss(ours_lp, ref, pairs, beta, eps)
    ours.backward()
    theirs_lp = torch.tensor(LOG_PROB, dtype=torch.float64, requires_grad=True)
    theirs = upstream_loss(theirs_lp[0::2], ref[0::2], theirs_lp[1::2], ref[1::2], beta, eps)
    theirs.backward()
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), abs=1e-12)
    assert torch.allclose(ours_lp.grad, theirs_lp.grad, atol=1e-12)
    if beta == 10.0:  # by hand: pair 0's log-ratios 0.03 and -0.05, both inside the clamp
        assert float(ours.detach()) > 0 and ours_lp.grad[0] < 0 < ours_lp.grad[1]
        assert ours_lp.grad[2] == 0 and ours_lp.grad[3] != 0  # pair 1: the winner is past the clamp


def test_pairs_equal_spos_compare():
    values = torch.tensor(
        [[0.10, 2.00, 1.20, -0.50], [0.30, 0.31, 0.29, 0.30], [5.0, 4.0, 4.2, 4.9], [1.0, 1.0, 1.0, 1.0]],
        dtype=torch.float64,
    )  # (M = 4 inputs, K = 4 candidates)
    for threshold in (0.0, 0.3, 0.9):
        win, lose, valid = preference_pairs(values, threshold)
        indices, valid_up = upstream_compare(values.T.clone(), threshold)
        assert valid.tolist() == valid_up.tolist()
        assert win[valid].tolist() == indices[0][valid_up].tolist()
        assert lose[valid].tolist() == indices[1][valid_up].tolist()
    assert preference_pairs(values, 0.3)[2].tolist() == [True, False, True, False]  # gaps 2.5, .02, 1
    assert preference_pairs(values, 0.0)[2].tolist() == [True, True, True, False]  # a tie is no pair
    # tanh(gap / 2) is the softmax difference: the threshold as a gap is 2 artanh(threshold).
    gap = 2 * math.atanh(0.3)
    near = torch.tensor([[0.0, gap - 1e-6], [0.0, gap + 1e-6]], dtype=torch.float64)
    assert preference_pairs(near, 0.3)[2].tolist() == [False, True]


def test_a_failed_score_drops_its_pool_and_pairs_carry_their_ranks(stub_rollout):
    m, k = 3, 2
    n = m * k
    candidates = stub_rollout(
        torch.arange(m).repeat_interleave(k),
        [f"i{i}" for i in range(n)],
        latents=torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1, 1).repeat(1, 2, 1, 1, 1),
    )
    scorers = (ScorerConfig("brightness", weight=10.0), ScorerConfig("jpeg", weight=-1.0))
    scores = Scores(
        {"brightness": np.array([0.1, 0.5, np.nan, 0.2, 0.9, 0.3]), "jpeg": np.zeros(n)},
        {"brightness": [None] * n, "jpeg": [None] * n},
    )
    values = judge_values(RewardConfig(scorers=scorers), scores)
    assert values[[0, 1, 3]].tolist() == pytest.approx([1.0, 5.0, 2.0]) and math.isnan(values[2])
    pairs = pair_batch(candidates, values, 0.3, k)
    assert pairs.item_ids == ["i1", "i0", "i4", "i5"]  # input 1's pool has a failed score
    assert pairs.group.tolist() == [0, 0, 1, 1] and pairs.ranks.tolist() == [0, 1, 0, 1]
