"""SPO's sampling: at every trained denoising step, a pool of candidates for x_{t-1} from one x_t.

Step-by-step preference optimisation (Liang et al. 2024, arXiv 2406.04314, sec. 4; RockeyCoss/SPO
`spo/custom_diffusers/multi_sample_pipeline.py`). For each input, from step `start_step` on:

1. the K = `pool_size` candidates x_{t-1}^k are drawn from the same x_t (one guided prediction, K
   noise draws);
2. each candidate's clean image is predicted as the judge sees it: the next step's guided prediction
   at x_{t-1}^k gives x0^k, decoded by the VAE (at the last step the candidate is x_0 itself);
   with `judge_steps` n > 1 (not in SPO) the candidate is instead carried to x_0 by n deterministic
   moves over the remaining steps (`lookahead_x0`), n - 1 more guided predictions per candidate;
3. the chain continues from one candidate drawn uniformly, reusing its prediction from 2.

What changed from SPO: the candidates of a step are returned as a `Rollout` of one-step trajectories
(latents (K M, 2, C, h, w) = [x_t, x_{t-1}^k]) with the step index in each item's metadata, handed
to `on_step` as soon as they exist, and judged by the caller; the choice of the next latent does not
depend on the judge (it is uniform in SPO too), so judging may run while the chain goes on. Written
anew around `EditPolicy.guided_noise` and `LogProbScheduler`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sampler.policy import EditPolicy, randn
from sampler.rollout import Rollout


@dataclass
class StepPool:
    """What one SPO sampling batch of M inputs produced.

    Attributes:
        final: M items, the chain each input followed (latents (M, T + 1, C, h, w), log-probs of
            the candidates taken, decoded final edits).
        candidates: one `Rollout` per pooled step: K M one-step trajectories, input-major (item
            m K + k is candidate k of input m, `group` m), images the judged clean predictions.
    """

    final: Rollout
    candidates: list[Rollout]


def lookahead_stops(index: int, num_steps: int, judge_steps: int) -> list[int]:
    """The step positions a lookahead from `index` stops at: at most `judge_steps` moves, evenly
    spaced over the remaining steps, ending at `num_steps` (the clean end)."""
    n = max(1, min(judge_steps, num_steps - index))
    return sorted({index + round((num_steps - index) * j / n) for j in range(n + 1)})


@torch.no_grad()
def lookahead_x0(
    policy: EditPolicy, x: torch.Tensor, eps: torch.Tensor, index: int, judge_steps: int, cond: tuple
) -> torch.Tensor:
    """Clean latents for the judge from latents x (B, C, h, w) at step `index` and their guided
    prediction eps: `judge_steps` 1 is the x0 prediction (SPO's); n > 1 moves deterministically
    (`LogProbScheduler.jump`) through the stops of `lookahead_stops`, one guided prediction at each.

    Args:
        cond: (text embeddings, image latents, exemplar latents or None), B rows each.
    """
    sched = policy.sched
    stops = lookahead_stops(index, sched.num_steps, judge_steps)
    for a, b in zip(stops[:-1], stops[1:], strict=True):
        x = sched.jump(eps, torch.full((len(x),), a, dtype=torch.long, device=x.device), x, b)
        if b < sched.num_steps:
            eps = policy.guided_noise(x, torch.full((len(x),), b, dtype=torch.long, device=x.device), *cond)
    return x


@torch.no_grad()
def step_pool_rollout(
    policy: EditPolicy,
    sources: torch.Tensor,
    instructions: list[str],
    pool_size: int,
    generator: torch.Generator,
    start_step: int = 0,
    exemplars: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    metadata: list[dict] | None = None,
    on_step: Callable[[Rollout], None] | None = None,
    policy_version: int = 0,
    judge_steps: int = 1,
) -> StepPool:
    """Sample M inputs with a pool of `pool_size` candidates at every stochastic step from `start_step`.

    Args:
        sources: (M, 3, H, W) in [0, 1]; instructions: M strings.
        pool_size: K candidates per step (>= 2).
        generator: CPU generator for x_T, every noise draw and every choice of the next latent.
        start_step: steps before it are sampled plainly (SPO's `divert_start_step`).
        exemplars: (M, 3, H, W) or None; masks: (M, H, W) bool or None; metadata: M dicts or None.
        on_step: called with each step's candidates as soon as they are decoded.
        judge_steps: how the judged clean image is made (`lookahead_x0`): 1 is SPO's x0 prediction.
    """
    m, k = sources.shape[0], pool_size
    if k < 2:
        raise ValueError(f"a pool needs at least 2 candidates, got {k}")
    dev = policy.device
    sched = policy.sched
    text = policy.encode_text(instructions)
    image_latents = policy.encode_images(sources)
    ex_latents = policy.encode_images(exemplars) if exemplars is not None else None
    shape = (m, *image_latents.shape[1:])
    x = (randn(shape, generator) * sched.init_noise_sigma).to(dev, torch.float32)
    pool = lambda t: None if t is None else t.repeat_interleave(k, dim=0)  # noqa: E731
    at = lambda i, n: torch.full((n,), i, dtype=torch.long, device=dev)  # noqa: E731
    stochastic = sched.step_is_stochastic()
    steps = sched.num_steps
    eps = policy.guided_noise(x, at(0, m), text, image_latents, ex_latents)
    traj, log_probs, candidates = [x], [], []
    for i in range(steps):
        if i < start_step or not bool(stochastic[i]):
            out = sched.step(eps, at(i, m), x, noise=randn(shape, generator).to(dev))
            x = out.prev_sample
            traj.append(x)
            log_probs.append(out.log_prob)
            if i + 1 < steps:
                eps = policy.guided_noise(x, at(i + 1, m), text, image_latents, ex_latents)
            continue
        # 1. K candidates x_{t-1}^k from the same x_t and eps (input-major: row m K + k).
        x_t = pool(x)
        out = sched.step(pool(eps), at(i, m * k), x_t, noise=randn((m * k, *shape[1:]), generator).to(dev))
        cand = out.prev_sample
        # 2. Each candidate's clean image: its own x0 prediction at the next step, or with
        # judge_steps > 1 where the lookahead takes it (x_0 itself at the last step).
        if i + 1 < steps:
            cond = (pool(text), pool(image_latents), pool(ex_latents))
            next_eps = policy.guided_noise(cand, at(i + 1, m * k), *cond)
            x0 = lookahead_x0(policy, cand, next_eps, i + 1, judge_steps, cond)
            timestep = int(sched.timesteps[i + 1])
        else:
            next_eps, x0, timestep = None, cand, 0
        meta = [{**(metadata[j] if metadata else {}), "step": i + 1, "num_steps": steps, "timestep": timestep}
                for j in range(m) for _ in range(k)]  # fmt: skip
        batch = Rollout(
            latents=torch.stack([x_t, cand], dim=1),
            step_index=at(i, m * k).view(-1, 1),
            log_probs=out.log_prob.view(-1, 1),
            stochastic=torch.ones(1, dtype=torch.bool, device=dev),
            text_embeds=pool(text),
            image_latents=pool(image_latents),
            images=policy.decode(x0),
            sources=pool(sources.float().to(dev)),
            group=torch.arange(m).repeat_interleave(k),
            instructions=[s for s in instructions for _ in range(k)],
            exemplar_latents=pool(ex_latents),
            masks=pool(masks),
            metadata=meta,
            policy_version=policy_version,
            item_ids=[f"s{i}-i{j}" for j in range(m * k)],
        )
        candidates.append(batch)
        if on_step is not None:
            on_step(batch)
        # 3. Continue from a uniformly drawn candidate, with its prediction from 2.
        rows = torch.arange(m, device=dev) * k + torch.randint(k, (m,), generator=generator).to(dev)
        x = cand[rows]
        traj.append(x)
        log_probs.append(out.log_prob[rows])
        if next_eps is not None:
            eps = next_eps[rows]
    final = Rollout(
        latents=torch.stack(traj, dim=1),
        step_index=torch.arange(steps, device=dev).expand(m, steps).clone(),
        log_probs=torch.stack(log_probs, dim=1),
        stochastic=stochastic,
        text_embeds=text,
        image_latents=image_latents,
        images=policy.decode(x),
        sources=sources.float().to(dev),
        group=torch.arange(m),
        instructions=list(instructions),
        exemplar_latents=ex_latents,
        masks=masks,
        metadata=[dict(d) for d in metadata] if metadata else None,
        policy_version=policy_version,
        item_ids=[f"i{j}" for j in range(m)],
    )
    return StepPool(final, candidates)
