"""SPO's pooled sampling: candidates of a step share x_t, the chain follows one of them, the pairs'
log-probabilities recompute to the recorded ones, and each candidate is judged on its own x0 prediction."""

from __future__ import annotations

import pytest
import torch

from sampler.models import load_components
from sampler.policy import EditPolicy
from sampler.scenes import shapes_batch
from sampler.schedulers import LogProbScheduler
from sampler.step_pool import lookahead_stops, step_pool_rollout


def _policy(path: str, kind: str, steps: int = 4) -> EditPolicy:
    return EditPolicy(
        load_components(path, scheduler=kind), kind, num_steps=steps, eta=1.0, guidance_scale=3.0
    )


def _sources(n: int) -> torch.Tensor:
    return torch.from_numpy(shapes_batch(3, n, 16)).permute(0, 3, 1, 2).float() / 255


@pytest.mark.parametrize("kind", ["ddim", "euler_ancestral"])
def test_candidates_share_x_t_and_the_chain_follows_one_of_them(tiny_model_dir, kind):
    policy = _policy(tiny_model_dir, kind)
    m, k = 3, 4
    seen = []
    pool = step_pool_rollout(
        policy, _sources(m), ["a", "b", "c"], k, torch.Generator().manual_seed(0), start_step=1,
        metadata=[{"id": j} for j in range(m)], on_step=seen.append,
    )  # fmt: skip
    stochastic = [i for i in range(4) if policy.sched.step_is_stochastic()[i] and i >= 1]
    assert [int(c.step_index[0, 0]) for c in pool.candidates] == stochastic
    assert seen == pool.candidates  # each step handed over as it was made
    final = pool.final
    assert final.latents.shape == (m, 5, 4, 8, 8) and final.log_probs.shape == (m, 4)
    for c in pool.candidates:
        i = int(c.step_index[0, 0])
        assert len(c) == m * k and c.latents.shape == (m * k, 2, 4, 8, 8)
        x_t, x_prev = c.latents[:, 0].view(m, k, -1), c.latents[:, 1].view(m, k, -1)
        for j in range(m):
            # One x_t per input, K different draws of x_{t-1} from it.
            assert all(torch.equal(x_t[j, 0], x_t[j, q]) for q in range(k))
            assert torch.equal(x_t[j, 0], final.latents[j, i].view(-1))
            assert len({tuple(x_prev[j, q].tolist()) for q in range(k)}) == k
            # The chain continues from one of the K candidates, with that candidate's log-prob.
            taken = [q for q in range(k) if torch.equal(x_prev[j, q], final.latents[j, i + 1].view(-1))]
            assert len(taken) == 1
            assert final.log_probs[j, i] == c.log_probs[j * k + taken[0], 0]
        assert c.group.tolist() == [j for j in range(m) for _ in range(k)]
        steps = policy.sched.num_steps
        assert c.metadata[k] == {
            "id": 1, "step": i + 1, "num_steps": steps,
            "timestep": int(policy.sched.timesteps[i + 1]) if i + 1 < steps else 0,
        }  # fmt: skip


def test_candidates_are_judged_on_their_own_x0_prediction(tiny_model_dir):
    """A candidate's image is the decoded x0 that the next step's guided prediction gives at it (SPO's
    multi_sample_pipeline.py, lines 167-172); at the last step, the decoded candidate itself."""
    policy = _policy(tiny_model_dir, "ddim", steps=3)
    sources = _sources(2)
    pool = step_pool_rollout(policy, sources, ["a", "b"], 2, torch.Generator().manual_seed(1))
    first, last = pool.candidates[0], pool.candidates[-1]
    with torch.no_grad():
        index = torch.ones(4, dtype=torch.long)
        eps = policy.guided_noise(first.latents[:, 1], index, first.text_embeds, first.image_latents)
        a_t = policy.sched.alpha_t[1]
        x0 = (first.latents[:, 1] - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        assert policy.sched.clip_sample  # diffusers' DDIM default, as its step() clips
        x0 = x0.clamp(-policy.sched.clip_range, policy.sched.clip_range)
        assert torch.allclose(first.images, policy.decode(x0), atol=1e-5)
        if int(last.step_index[0, 0]) == 2:  # the last step draws noise: candidates are x_0 itself
            assert torch.allclose(last.images, policy.decode(last.latents[:, 1]), atol=1e-6)


@pytest.mark.parametrize("kind", ["ddim", "euler_ancestral"])
def test_pair_log_probs_recompute_to_the_recorded_ones(tiny_model_dir, kind):
    """A win/lose pair picked out of the pools scores, under unchanged weights, the log-probs recorded
    while sampling (so SPO's ratio to the reference starts at exactly 1)."""
    policy = _policy(tiny_model_dir, kind)
    pool = step_pool_rollout(policy, _sources(2), ["a", "b"], 3, torch.Generator().manual_seed(2))
    for c in pool.candidates:
        pair = c.select([2, 0, 4, 5])  # input 0: candidates 2 and 0; input 1: 1 and 2
        with torch.no_grad():
            lp = policy.step_log_prob(pair, 0)
        # float32 round-off of batches of other sizes (3e-7 here), as for the plain rollout
        assert torch.allclose(lp, pair.log_probs[:, 0], atol=1e-6), (lp - pair.log_probs[:, 0]).abs().max()


def test_lookahead_stops_spread_the_moves_over_the_remaining_steps():
    assert lookahead_stops(1, 10, 1) == [1, 10]  # SPO's: the x0 prediction
    assert lookahead_stops(1, 10, 3) == [1, 4, 7, 10]
    assert lookahead_stops(8, 10, 5) == [8, 9, 10]  # never more moves than steps left


def test_a_full_lookahead_is_the_eta_0_ddim_chain_from_the_candidate(tiny_model_dir):
    """judge_steps >= the steps left: a candidate is judged on the clean prediction at the end of the
    deterministic DDIM chain (eta 0, Song et al. 2021 eq. 12: x_{t-1} = sqrt(a_prev) x0 + sqrt(1 -
    a_prev) eps) run from it, a guided prediction at every step; with 2 moves over 3 steps left, on
    the chain that jumps from step 1 to 3 (rounded middle) and finishes from there."""
    policy = _policy(tiny_model_dir, "ddim", steps=4)
    sources = _sources(2)
    full, two = (
        step_pool_rollout(policy, sources, ["a", "b"], 2, torch.Generator().manual_seed(1), judge_steps=j)
        for j in (9, 2)
    )
    first = full.candidates[0]
    assert int(first.step_index[0, 0]) == 0 and torch.equal(first.latents, two.candidates[0].latents)
    cond = (first.text_embeds, first.image_latents)
    eta0 = LogProbScheduler(policy.sched.scheduler, "ddim", 4, eta=0.0)

    def eps_at(x, i):
        return policy.guided_noise(x, torch.full((len(x),), i, dtype=torch.long), *cond)

    with torch.no_grad():
        x = first.latents[:, 1]
        for i in (1, 2):
            x = eta0.step(eps_at(x, i), torch.full((4,), i), x).prev_sample
        want = policy.decode(eta0.pred_x0(eps_at(x, 3), torch.full((4,), 3), x))
        assert torch.allclose(full.candidates[0].images, want, atol=1e-5)
        # Two moves: from step 1 straight to step 3 (a_s = alpha_t[3]), then the x0 prediction there.
        x, e = first.latents[:, 1], eps_at(first.latents[:, 1], 1)
        x0 = eta0.pred_x0(e, torch.full((4,), 1), x)
        a_s = policy.sched.alpha_t[3]
        x = a_s**0.5 * x0 + (1 - a_s) ** 0.5 * e
        want = policy.decode(eta0.pred_x0(eps_at(x, 3), torch.full((4,), 3), x))
        assert torch.allclose(two.candidates[0].images, want, atol=1e-5)
        assert not torch.allclose(two.candidates[0].images, full.candidates[0].images, atol=1e-3)
