"""One epoch of AlignProp: sample each shard with gradients, score it with a differentiable reward,
backpropagate minus the weighted reward into the trained weights (LoRA or the whole UNet).

Each shard (a sampling batch, `sample.batch_size` x `sample.nb_gen` edits, planned by
`plan_epoch` with its own noise) is one backward pass; `train.gradient_accumulation_steps` of them
make one optimizer step (clipped to `train.max_grad_norm`, as `Learner` does). K, the steps with a
graph, is drawn per shard from the epoch generator (`trainer.algo.alignprop.backprop_steps`).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from tqdm.auto import tqdm

from sampler.differentiable import GradSample, sample_with_grad
from sampler.rollout import Rollout
from trainer.algo.alignprop import backprop_steps, reward_loss
from trainer.config import Config
from trainer.engine.learner import Learner
from trainer.engine.shards import Shard
from trainer.rewards.scores import Scores


def record_of(sample: GradSample, shard: Shard, config: Config, policy, version: int) -> Rollout:
    """The shard's edits as a detached `Rollout` (x_T and x_0 as its latents, no log-probs), for the
    scorers' per-item facts, the metrics and the sample grid."""
    nb_gen = config.sample.nb_gen
    n = sample.images.shape[0]
    rep = lambda x: None if x is None else x.repeat_interleave(nb_gen, dim=0)  # noqa: E731
    r = Rollout(
        latents=torch.stack([sample.x_T, sample.x_0], dim=1),
        step_index=torch.zeros((n, 0), dtype=torch.long),
        log_probs=torch.zeros((n, 0)),
        stochastic=policy.sched.step_is_stochastic(),
        text_embeds=sample.text_embeds,
        image_latents=sample.image_latents,
        images=sample.images.detach(),
        sources=rep(shard.inputs.sources.float()).to(policy.device),
        group=torch.arange(n // nb_gen).repeat_interleave(nb_gen),
        instructions=[s for s in shard.inputs.instructions for _ in range(nb_gen)],
        masks=rep(shard.inputs.masks),
        policy_version=version,
    )
    r.item_ids = [f"e{shard.epoch}-b{shard.index}-i{i}" for i in range(n)]
    meta = getattr(shard.inputs, "metadata", None)
    if meta is not None:
        r.metadata = [dict(m) for m in meta for _ in range(nb_gen)]
    return r


def draw_backprop_steps(config: Config, n: int, generator: torch.Generator) -> list[int]:
    """K for each of `n` shards in turn, from the epoch generator (`backprop_steps`)."""
    t, s = config.train, config.sample
    return [
        backprop_steps(t.backprop_min_steps, t.backprop_max_steps, s.num_steps, generator) for _ in range(n)
    ]


def alignprop_epoch(
    learner: Learner,
    shards: list[Shard],
    reward,
    generator: torch.Generator | None,
    progress: bool = False,
    ks: list[int] | None = None,
) -> tuple[Rollout, Scores, dict[str, float]]:
    """Train on every shard of the epoch; returns the edits, their rewards and the update's numbers.

    Args:
        learner: owns the policy, the trained weights and the optimizer.
        shards: the epoch's sampling batches (`plan_epoch`).
        reward: `trainer.rewards.differentiable` reward: (images, rollout) -> {scorer: (N,) tensor}.
        generator: the epoch generator after `plan_epoch` (draws K per shard), unless `ks` gives
            each shard's K (a Ray learner gets the Ks the driver drew for its shards).
    """
    config, policy = learner.config, learner.policy
    t, s = config.train, config.sample
    weights = {sc.name: sc.weight for sc in config.reward.scorers}
    accum = t.gradient_accumulation_steps
    stats: dict[str, list[float]] = defaultdict(list)
    parts, values = [], defaultdict(list)
    unet = policy.unet
    unet.train()
    learner.optimizer.zero_grad(set_to_none=True)
    for b, shard in enumerate(tqdm(shards, desc="alignprop", leave=False, disable=not progress)):
        k = ks[b] if ks is not None else draw_backprop_steps(config, 1, generator)[0]
        noise = torch.Generator()
        noise.set_state(shard.noise_state)
        with learner.accelerator.autocast():
            sample = sample_with_grad(
                policy,
                shard.inputs.sources,
                shard.inputs.instructions,
                k,
                nb_gen=s.nb_gen,
                generator=noise,
                shared_noise=s.shared_noise,
                exemplars=shard.inputs.exemplars,
                gradient_checkpointing=t.gradient_checkpointing,
            )
            rollout = record_of(sample, shard, config, policy, learner.version)
            rewards = reward(sample.images, rollout)
            loss, total = reward_loss(rewards, weights, t.alignprop_loss_coeff)
        if torch.isfinite(loss):
            (loss / accum).backward()
        else:
            learner.nonfinite_skipped += 1
        if (b + 1) % accum == 0:
            learner._apply_update()
        parts.append(rollout)
        for name, v in rewards.items():
            values[name].append(v.detach().double().cpu().numpy())
        stats["loss"].append(float(loss.detach()))
        stats["reward"].append(float(total.detach().mean()))
        stats["backprop_steps"].append(float(k))
    unet.eval()
    learner.version += 1
    joined = {name: np.concatenate(v) for name, v in values.items()}
    scores = Scores(joined, {name: [None] * len(v) for name, v in joined.items()})
    out = {key: sum(v) / len(v) for key, v in stats.items()}
    out["nonfinite_skipped"] = float(learner.nonfinite_skipped)
    return Rollout.concat(parts) if len(parts) > 1 else parts[0], scores, out
