"""Advantages, PPO-clip and SPIE's Plackett-Luce ranking loss, against their definitions."""

from __future__ import annotations

import itertools
import math

import torch

from trainer.algo.objectives import group_advantages, plackett_luce_loss, ppo_clip_loss, ranking_from_scores


def test_group_advantages_normalise_within_groups_and_fall_back_for_small_groups():
    rewards = torch.tensor([1.0, 3.0, 10.0, 20.0, 30.0, 5.0])
    group = torch.tensor([0, 0, 1, 1, 1, 2])
    adv = group_advantages(rewards, group, min_group_size=2)
    assert torch.allclose(adv[:2], torch.tensor([-1.0, 1.0]) / math.sqrt(2), atol=1e-6)
    assert torch.allclose(adv[2:5], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6)
    assert adv[5] == (5.0 - rewards.mean()) / (rewards.std() + 1e-8)  # singleton: batch statistics
    adv = group_advantages(rewards, group, min_group_size=2, fallback=(4.0, 2.0))
    assert torch.isclose(adv[5], torch.tensor(0.5))


def test_ppo_clip_matches_the_surrogate():
    lp = torch.tensor([0.0, 0.5, -0.5, 0.05], requires_grad=True)
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, -2.0])
    loss, info = ppo_clip_loss(lp, old, adv, clip_range=0.2)
    ratio = torch.exp(lp.detach())
    expected = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
    assert torch.isclose(loss, expected)
    loss.backward()
    # Items 1 and 2 sit outside the trust region on the side that stops their gradient.
    assert lp.grad[1] == 0 and lp.grad[2] == 0 and lp.grad[0] < 0 and lp.grad[3] > 0
    assert info["clipfrac"] == 0.5


def test_plackett_luce_loss_is_the_ranking_negative_log_likelihood():
    torch.manual_seed(0)
    lp, ref = torch.randn(6) * 0.05, torch.randn(6) * 0.05
    ranking = torch.tensor([[2, 0, 1], [3, 5, 4]])
    beta, eps = 0.7, 0.1
    loss = plackett_luce_loss(lp, ref, ranking, beta, eps)
    r = torch.exp(lp - ref).clamp(1 - eps, 1 + eps) ** beta
    manual = 0.0
    for row in ranking:
        p = 1.0
        for k in range(len(row)):
            p *= r[row[k]] / r[row[k:]].sum()
        manual += -math.log(p)
    assert math.isclose(float(loss), manual / 2, rel_tol=1e-5)
    # Its likelihood is a distribution over the K! orderings.
    total = 0.0
    for perm in itertools.permutations(range(3)):
        total += math.exp(-float(plackett_luce_loss(lp, ref, torch.tensor([perm]), beta, eps)))
    assert math.isclose(total, 1.0, rel_tol=1e-5)


def test_plackett_luce_gradient_raises_the_preferred_edit_and_stops_outside_the_clamp():
    lp = torch.zeros(2, requires_grad=True)
    plackett_luce_loss(lp, torch.zeros(2), torch.tensor([[1, 0]]), beta=1.0, eps=0.1).backward()
    assert lp.grad[1] < 0 < lp.grad[0]  # descent raises the winner's log-prob, lowers the loser's
    lp = torch.tensor([0.5, -0.5], requires_grad=True)  # both ratios beyond [0.9, 1.1]
    plackett_luce_loss(lp, torch.zeros(2), torch.tensor([[1, 0]]), beta=1.0, eps=0.1).backward()
    assert torch.equal(lp.grad, torch.zeros(2))


def test_ranking_orders_each_group_best_first():
    structural = torch.tensor([0.0, 1.0, 0.5, 0.2, 0.1, 0.3])
    semantic = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 0.0])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    assert ranking_from_scores(structural, None, group).tolist() == [[1, 2, 0], [5, 3, 4]]
    assert ranking_from_scores(None, semantic, group).tolist()[0] == [0, 2, 1]
    mixed = ranking_from_scores(structural, semantic, group, score_alpha=10.0)
    assert mixed.tolist()[0] == [0, 2, 1]
