"""SPIE's standardisation over each sampling batch gathered from every process, on fixed numbers.

Upstream (`ebenarous/SPIE` `scripts/train.py`, lines 353-362 at commit 4c87694): every process
samples a batch of `sample.batch_size` inputs x `nb_gen` edits and scores it; the distances are
gathered from all processes (`accelerator.gather`, lines 355 and 358), standardised over the gathered
batch, and each input's edits ranked (argsort ascending: distances, lower is better). With Ray our
learners are the processes: shard B is learner B // n's sampling batch B mod n (n =
`sample.num_batches_per_epoch`).
"""

from __future__ import annotations

import torch

from sampler.rollout import Rollout
from trainer.algo.objectives import ranking_from_scores
from trainer.algo.signals import spie_signals
from trainer.config import RewardConfig, ScorerConfig, TrainConfig
from trainer.rewards.scores import Scores

B, K, ALPHA = 3, 4, 0.7
REWARD = RewardConfig(
    scorers=(ScorerConfig(name="sem", role="semantic"), ScorerConfig(name="struct", role="structural"))
)
TRAIN = TrainConfig(objective="spie_ranking", rec_lambda=0.0, score_alpha=ALPHA)


def _upstream_step(sem_dists, struct_dists):
    """Lines 355-362 for one sampling step: the P processes' (B, K) distances gathered (process order),
    standardised over all of them, ranked per input. Returns (P * B, K)."""
    avd_struct = torch.cat(struct_dists)
    avd_struct = (avd_struct - avd_struct.mean()) / (avd_struct.std() + 1e-8)
    adv_sem = torch.cat(sem_dists)
    adv_sem = (adv_sem - adv_sem.mean()) / (adv_sem.std() + 1e-8)
    return torch.argsort(avd_struct + ALPHA * adv_sem, axis=1)


def _batch(make_rollout, processes: int, per_process: int, seed: int = 5):
    """Shards b = p * per_process + k with (B, K) distances whose scale differs per shard, so that
    standardising per shard and over a gathered step give different orders."""
    g = torch.Generator().manual_seed(seed)
    parts, sem, struct = [], {}, {}
    for p in range(processes):
        for k in range(per_process):
            b = p * per_process + k
            sem[p, k] = torch.rand(B, K, generator=g, dtype=torch.float64) * (1 + 3 * p) + p
            struct[p, k] = torch.rand(B, K, generator=g, dtype=torch.float64) * (1 + 5 * (1 - p))
            n = B * K
            parts.append(
                make_rollout(
                    torch.arange(B).repeat_interleave(K) + b * B, [f"e0-b{b}-i{i}" for i in range(n)]
                )
            )
    rollout = Rollout.concat(parts)
    order = [(p, k) for p in range(processes) for k in range(per_process)]
    scores = Scores(
        {
            "sem": -torch.cat([sem[o].reshape(-1) for o in order]).numpy(),  # ours: higher is better
            "struct": -torch.cat([struct[o].reshape(-1) for o in order]).numpy(),
        },
        {"sem": [None] * len(rollout), "struct": [None] * len(rollout)},
    )
    return rollout, scores, sem, struct


def test_two_learners_rank_as_spie_over_two_processes(stub_rollout):
    """2 learners x 2 sampling batches each: our ranking = SPIE's on 2 processes, step by step; the
    per-shard standardisation we had ranks some inputs differently."""
    rollout, scores, sem, struct = _batch(stub_rollout, processes=2, per_process=2)
    structural, semantic = spie_signals(REWARD, TRAIN, scores, rollout, batches_per_process=2)
    ours = (ranking_from_scores(structural, semantic, rollout.group, ALPHA) % K).view(2, 2, B, K)
    for k in range(2):
        theirs = _upstream_step([sem[0, k], sem[1, k]], [struct[0, k], struct[1, k]]).view(2, B, K)
        assert ours[:, k].tolist() == theirs.tolist()
    per_shard = ranking_from_scores(*spie_signals(REWARD, TRAIN, scores, rollout), rollout.group, ALPHA)
    assert (per_shard % K).view(2, 2, B, K).tolist() != ours.tolist()


def test_one_process_is_bit_identical_to_per_shard(stub_rollout):
    """One learner: each sampling batch is gathered from itself alone, so the signals are exactly the
    per-shard ones (and SPIE's on one process)."""
    rollout, scores, sem, struct = _batch(stub_rollout, processes=1, per_process=3, seed=2)
    gathered = spie_signals(REWARD, TRAIN, scores, rollout, batches_per_process=3)
    per_shard = spie_signals(REWARD, TRAIN, scores, rollout)
    assert all(torch.equal(a, b) for a, b in zip(gathered, per_shard, strict=True))
    ours = ranking_from_scores(*gathered, rollout.group, ALPHA) % K
    theirs = torch.cat([_upstream_step([sem[0, k]], [struct[0, k]]) for k in range(3)])
    assert ours.tolist() == theirs.tolist()
