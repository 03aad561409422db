"""Advantages, PPO-clip and SPIE's Plackett-Luce ranking loss, against their definitions."""

from __future__ import annotations

import itertools
import math

import torch

from trainer.algo.diagnostics import ratio_diagnostics, ratio_fields
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


def test_batch_scaled_advantages_keep_groups_of_alike_edits_small():
    # Group 0's edits score alike (noise), group 1's split into successes and failures.
    rewards = torch.tensor([0.50, 0.51, 0.49, 0.50, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    per_group = group_advantages(rewards, group)
    batch = group_advantages(rewards, group, scale="batch")
    # With each group's own std both groups get unit-scale advantages ...
    assert torch.isclose(per_group[:4].std(), per_group[4:].std())
    # ... with one std over the batch (Dr. GRPO): centred rewards / their std over all 8.
    centred = torch.cat([rewards[:4] - rewards[:4].mean(), rewards[4:] - rewards[4:].mean()])
    assert torch.allclose(batch, centred / (centred.std() + 1e-8))
    assert batch[:4].abs().max() < 0.03 * batch[4:].abs().max()


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


def _spie_reference_preference(sem_dist, struct_dist, gen, src, masks, rec_lambda, score_alpha):
    """SPIE's own lines on one sampling batch, for B inputs x K edits (ebenarous/SPIE, main).

    SPIE/reward_modeling/score_functions.py, lines 117-127 (semantic distance + raw reconstruction
    MSE outside the mask, all pixels where the mask is full or empty):
        MSE_loss = torch.nn.MSELoss(reduction='none')(gen_images, in_images).mean(dim=1)
        masks_MSE = ~masks_pixel_gen
        zero_rows = (masks_MSE == 0).all(dim=(1,2)); masks_MSE[zero_rows] = 1
        mean_MSE_loss = (MSE_loss * masks_MSE).sum((1,2)) / masks_MSE.sum((1, 2))
        mean_cos_dist += rec_lambda * mean_MSE_loss
    scripts/train.py, lines 353-362 (each score standardised once over the sampling batch, then
    ranked ascending, as SPIE's scores are distances, lower is better):
        avd_struct = (avd_struct - avd_struct.mean()) / (avd_struct.std() + 1e-8)
        adv_sem = (adv_sem - adv_sem.mean()) / (adv_sem.std() + 1e-8)
        preference_gathered = torch.argsort(avd_struct + config.train.score_alpha * adv_sem, axis=1)

    Args: sem_dist, struct_dist (B, K) distances; gen (B, K, 3, H, W); src (B, 3, H, W);
    masks (B, H, W) bool. Returns (B, K): per input, its edits' positions best first.
    """
    L_sem = []
    for k in range(gen.shape[1]):
        mse = torch.nn.MSELoss(reduction="none")(gen[:, k], src).mean(dim=1)
        masks_mse = ~masks.clone()
        zero_rows = (masks_mse == 0).all(dim=(1, 2))
        masks_mse[zero_rows] = 1
        mean_mse = (mse * masks_mse).sum((1, 2)) / masks_mse.sum((1, 2))
        L_sem.append(sem_dist[:, k] + rec_lambda * mean_mse)
    adv_sem = torch.stack(L_sem, axis=1)
    adv_sem = (adv_sem - adv_sem.mean()) / (adv_sem.std() + 1e-8)
    avd_struct = (struct_dist - struct_dist.mean()) / (struct_dist.std() + 1e-8)
    return torch.argsort(avd_struct + score_alpha * adv_sem, axis=1)


def test_ranking_matches_spie_reference_lines():
    import numpy as np

    from sampler.rollout import Rollout
    from trainer.algo.signals import spie_signals
    from trainer.config import RewardConfig, ScorerConfig, TrainConfig
    from trainer.rewards.scores import Scores

    g = torch.Generator().manual_seed(3)
    n_batches, B, K, H = 2, 3, 4, 8
    rec_lambda, score_alpha = 0.5, 0.7
    parts, expected = [], []
    for b in range(n_batches):
        src = torch.rand(B, 3, H, H, generator=g, dtype=torch.float64)
        gen = (src[:, None] + 0.3 * torch.randn(B, K, 3, H, H, generator=g, dtype=torch.float64)).clamp(0, 1)
        masks = torch.zeros(B, H, H, dtype=torch.bool)
        masks[0, 2:5, 1:6] = True
        masks[1] = True  # whole image: MSE over all pixels
        # masks[2] stays empty: MSE over all pixels as well
        # Small semantic spread, so the raw MSE term decides some of the orders.
        sem_dist = 0.005 * torch.rand(B, K, generator=g, dtype=torch.float64) + b
        struct_dist = 0.01 * torch.rand(B, K, generator=g, dtype=torch.float64) * (b + 1)
        expected.append(
            _spie_reference_preference(sem_dist, struct_dist, gen, src, masks, rec_lambda, score_alpha)
        )
        N = B * K
        parts.append(
            (
                Rollout(
                    latents=torch.zeros(N, 2, 1, 1, 1),
                    step_index=torch.zeros(N, 1, dtype=torch.long),
                    log_probs=torch.zeros(N, 1),
                    stochastic=torch.ones(1, dtype=torch.bool),
                    text_embeds=torch.zeros(N, 1, 1),
                    image_latents=torch.zeros(N, 1, 1, 1),
                    images=gen.reshape(N, 3, H, H).float(),
                    sources=src.repeat_interleave(K, dim=0).float(),
                    group=torch.arange(B).repeat_interleave(K),
                    instructions=["x"] * N,
                    masks=masks.repeat_interleave(K, dim=0),
                    item_ids=[f"e0-b{b}-i{i}" for i in range(N)],
                ),
                -sem_dist.reshape(N).numpy(),  # our scores: higher is better
                -struct_dist.reshape(N).numpy(),
            )
        )
    rollout = Rollout.concat([p[0] for p in parts])
    scores = Scores(
        {"sem": np.concatenate([p[1] for p in parts]), "struct": np.concatenate([p[2] for p in parts])},
        {"sem": [None] * len(rollout), "struct": [None] * len(rollout)},
    )
    reward = RewardConfig(
        scorers=(ScorerConfig(name="sem", role="semantic"), ScorerConfig(name="struct", role="structural"))
    )
    train = TrainConfig(objective="spie_ranking", rec_lambda=rec_lambda, score_alpha=score_alpha)
    structural, semantic = spie_signals(reward, train, scores, rollout)
    ranking = ranking_from_scores(structural, semantic, rollout.group, score_alpha)
    ours = ranking % K  # batch indices -> positions within the group
    assert ours.tolist() == torch.cat(expected).tolist()
    # The reconstruction term matters here: without it the orders differ.
    no_rec = ranking_from_scores(
        *spie_signals(reward, TrainConfig(rec_lambda=0.0), scores, rollout), rollout.group, score_alpha
    )
    assert (no_rec % K).tolist() != ours.tolist()


def test_ranking_weights_take_effect():
    # A lone scorer's weight scales its standardised signal (it used to be standardised away).
    structural = torch.tensor([0.0, 1.0, 0.0, 1.0])
    semantic = torch.tensor([1.0, 0.0, 1.0, 0.0])
    group = torch.tensor([0, 0, 1, 1])
    assert ranking_from_scores(0.5 * structural, semantic, group).tolist() == [[0, 1], [2, 3]]
    assert ranking_from_scores(2.0 * structural, semantic, group).tolist() == [[1, 0], [3, 2]]


def test_ratio_diagnostics_count_both_sides_and_a_collapse():
    # clip_range 1.0: the lower clamp (ratio < 0) can never act, a collapsed ratio still shows.
    log_ratio = torch.log(torch.tensor([1.0, 3.0, 0.01, 0.4, 1.5]))
    info = ratio_diagnostics(log_ratio, clip_range=1.0)
    assert info["clipfrac_high"] == 0.2 and info["clipfrac_low"] == 0.0 and info["clipfrac"] == 0.2
    assert torch.isclose(info["ratio_collapse"], torch.tensor(0.4, dtype=torch.float64))
    line = ratio_fields({k: float(v) for k, v in info.items()})[0]
    assert "clipfrac=0.20 (low 0.00 / high 0.20)" in line and "RATIO COLLAPSE: 40%" in line
    # clip_range 0.2: both clamps act; a ratio of 0.7 is clipped low (one in ten: no flag).
    info = ratio_diagnostics(torch.log(torch.tensor([0.7, 1.3] + [1.0] * 8)), clip_range=0.2)
    assert info["clipfrac_low"] == 0.1 and info["clipfrac_high"] == 0.1 and info["clipfrac"] == 0.2
    assert "COLLAPSE" not in ratio_fields({k: float(v) for k, v in info.items()})[0]
