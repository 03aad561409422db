"""`train.objective: nft`: DiffusionNFT (arXiv 2509.16117), likelihood-free: forward-process training
from the final latents and the group-normalised advantages. Settings: `train.nft_beta`,
`train.nft_decay_type` and `train.kl_coef` on the network's outputs (`trainer.config.train.NFTSettings`).

One epoch of updates

Following `NVlabs/DiffusionNFT` `scripts/train_nft_sd3.py` (lines 855-975): for each trained item and
noise level, x_t is drawn on the forward process from the rollout's clean final latents, the current
and the sampling ("old") policies predict x0 from it, and `trainer.algo.nft.nft_loss` pulls the
current model towards the old one plus (advantage-weighted) the implicit positive policy. No
log-probabilities are used, so any sampler works (the ODE too). The KL term (`train.kl_coef`, their
`train.beta`) is upstream's (lines 966-970): the squared distance of the network's outputs to the
reference's (velocities; InstructPix2Pix's noise predictions), not of the x0 predictions, which
would weigh it by sigma^2 and let it vanish at low noise.

The old policy (`train.nft_decay_type`, upstream's `decay_type` and lines 1034-1039): with 0 it is
the policy that sampled the batch; with 1 or 2 the learner keeps old weights, updated after each
epoch to d old + (1 - d) current (`trainer.algo.nft.old_policy_decay`). What changed: the rollouts
are sampled with the current weights (upstream samples with the old ones); the old predictions are computed
once, before the first update; the noise levels are the sampler's steps, a random
`train.timestep_fraction` of them per item, as the other objectives pick. The old weights and the
step count are checkpointed with the optimizer's state (`Learner.optimizer_checkpoint`), so a resumed
run goes on with them.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from tqdm.auto import tqdm

from sampler.rollout import Rollout
from trainer.algo.nft import DECAY_SCHEDULES, nft_loss, old_policy_decay, output_kl
from trainer.algo.signals import attach_group_advantages
from trainer.engine.learner import record
from trainer.objectives.base import Objective
from trainer.registry import register_objective
from trainer.rewards.scores import Scores


def nft_plan(rollout: Rollout, steps: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(N, k) step positions per item: a random subset of the first `steps` steps."""
    return torch.stack([torch.randperm(steps, generator=generator)[:k] for _ in range(len(rollout))])


def train_nft(
    learner, rollout: Rollout, generator: torch.Generator, progress: bool = False
) -> dict[str, float]:
    """`train.num_inner_epochs` passes of DiffusionNFT over a batch carrying `advantages` (N,)."""
    t, policy = learner.config.train, learner.policy
    if rollout.advantages is None:
        raise ValueError("nft needs the batch's advantages")
    n, k = len(rollout), learner.steps_per_trajectory
    steps = rollout.latents.shape[1] - 1 - t.skip_final_steps
    x0_shape = tuple(rollout.latents.shape[2:])
    plans, noises = [], []
    for _ in range(t.num_inner_epochs):
        plans.append(nft_plan(rollout, steps, k, generator))
        noises.append(torch.randn((n, k, *x0_shape), generator=generator))
    if t.nft_decay_type and getattr(learner, "nft_old", None) is None:  # upstream lines 576-579
        learner.nft_old = {name: p.detach().clone() for name, p in learner.params.items()}
    # The old policy's predictions, before any update.
    olds = [torch.empty((n, k, *x0_shape)) for _ in plans]
    with torch.no_grad(), policy.eval_mode(), learner.accelerator.autocast(), _old_weights(learner):
        for plan, noise, old in zip(plans, noises, olds, strict=True):
            for start in range(0, n, t.batch_size):
                rows = torch.arange(start, min(start + t.batch_size, n))
                batch = rollout.select(rows)
                for j in range(k):
                    index = plan[rows, j].to(policy.device)
                    old[rows, j] = policy.forward_x0(batch, index, noise[rows, j]).float().cpu()
    stats: dict[str, list[float]] = defaultdict(list)
    model = policy.denoiser
    model.train()
    bar = tqdm(
        total=t.num_inner_epochs * (n // t.batch_size) * k, desc="training", leave=False, disable=not progress
    )
    for plan, noise, old in zip(plans, noises, olds, strict=True):
        for mb in torch.randperm(n, generator=generator).view(-1, t.batch_size):
            batch = rollout.select(mb)
            x0 = batch.latents[:, -1].to(policy.device)
            for j in range(k):
                index = plan[mb, j].to(policy.device)
                with learner.accelerator.accumulate(model), learner.accelerator.autocast():
                    pred = policy.forward_x0(batch, index, noise[mb, j], with_output=t.kl_coef > 0)
                    pred, out = pred if t.kl_coef > 0 else (pred, None)
                    loss, info = nft_loss(
                        pred.float(),
                        old[mb, j].to(policy.device),
                        x0,
                        batch.advantages.to(policy.device),
                        t.nft_beta,
                        t.adv_clip_max,
                    )
                    if t.kl_coef > 0:
                        with torch.no_grad(), learner._reference():
                            _, ref = policy.forward_x0(batch, index, noise[mb, j], with_output=True)
                        kl = output_kl(out.float(), ref.float())
                        loss = loss + t.kl_coef * kl
                        info["kl"] = kl.detach()
                    learner.backward(loss)
                    learner.nft_steps = getattr(learner, "nft_steps", 0) + int(
                        learner.accelerator.sync_gradients
                    )
                record(stats, loss, info)
                bar.update()
    bar.close()
    model.eval()
    _update_old_weights(learner)
    learner.version += 1
    out = {key: sum(v) / len(v) for key, v in stats.items() if v}
    out["nonfinite_skipped"] = float(learner.nonfinite_skipped)
    return out


@contextlib.contextmanager
def _old_weights(learner):
    """Run the policy with the learner's old weights in place of the trained ones (decay types 1 and
    2; the old weights start as a copy of the current ones, as upstream's lines 576-579)."""
    old = getattr(learner, "nft_old", None)
    if old is None:
        yield
        return
    current = {name: p.detach().clone() for name, p in learner.params.items()}
    with torch.no_grad():
        for name, p in learner.params.items():
            p.copy_(old[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in learner.params.items():
                p.copy_(current[name])


def _update_old_weights(learner) -> None:
    """After an epoch: old <- d old + (1 - d) current, d = `old_policy_decay(optimizer steps so far)`
    (upstream lines 1034-1039). Type 0 keeps no old weights (d is always 0: old = current)."""
    decay_type = learner.config.train.nft_decay_type
    if decay_type == 0:
        return
    d = old_policy_decay(getattr(learner, "nft_steps", 0), decay_type)
    old = learner.nft_old
    learner.nft_old = {name: old[name] * d + p.detach() * (1 - d) for name, p in learner.params.items()}


@register_objective
class NFT(Objective):
    name = "nft"

    def check(self, need) -> None:
        t = self.config.train
        need(t.nft_beta > 0, f"train.nft_beta must be > 0, got {t.nft_beta}")
        need(
            t.nft_decay_type in DECAY_SCHEDULES,
            f"train.nft_decay_type must be one of {sorted(DECAY_SCHEDULES)}, got {t.nft_decay_type}",
        )

    def attach_signal(self, rollout: Rollout, scores: Scores, stats) -> None:
        attach_group_advantages(self.config, rollout, scores, stats)

    def trained_steps(self, policy) -> int:
        """DiffusionNFT trains on the forward process: every step's noise level serves."""
        t = self.config.train
        return min(self.config.train_timesteps, self.config.sample.num_steps - t.skip_final_steps)

    def learn(self, learner, rollout: Rollout, generator: torch.Generator, progress: bool) -> dict:
        return train_nft(learner, rollout, generator, progress)
