"""The policy being trained: model setup (LoRA or full), the optimizer, and one epoch of updates.

The update loop follows ddpo-pytorch `scripts/train.py` (inner epochs, per-trajectory shuffled
timesteps, gradient accumulation over timesteps and micro-batches through accelerate) and SPIE
`scripts/train.py` (the ranking loss per timestep against a frozen reference). Written anew around
`EditPolicy.step_log_prob`.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from sampler.policy import EditPolicy
from sampler.rollout import Rollout
from trainer.algo.objectives import kl_penalty, ranking_of, step_mean_kl
from trainer.config import Config
from trainer.engine.policy import trainable_parameters
from trainer.errors import UserError
from trainer.registry import make_objective


def record(stats: dict[str, list[float]], loss: torch.Tensor, info: dict) -> None:
    """Append one micro-batch's loss and diagnostics to the pass's lists."""
    stats["loss"].append(float(loss.detach()))
    for key, value in info.items():
        stats[key].append(float(value))


class Learner:
    """Owns the optimizer and runs the objective on rollouts.

    Args:
        config: the run configuration.
        policy: the policy to train (its UNet is updated in place).
    """

    def __init__(self, config: Config, policy: EditPolicy) -> None:
        from accelerate import Accelerator

        self.config = config
        self.policy = policy
        t = config.train
        self.params = trainable_parameters(policy, config.model.use_lora)
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()),
            lr=t.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.adam_weight_decay,
            eps=t.adam_epsilon,
        )
        # The objective (`trainer.objectives.base.Objective`) gives the loss and how many steps of
        # each trajectory are trained: only stochastic steps have a log-prob (DDIM's last step with
        # alpha_prev = 1 and Euler-ancestral's last step are deterministic).
        self.objective = make_objective(config)
        self.steps_per_trajectory = 1 if self.objective.one_step else self.objective.trained_steps(policy)
        if self.steps_per_trajectory < 1:
            raise UserError(
                "no denoising step draws noise: raise sample.eta, sample.noise_level or num_steps"
            )
        # One optimizer step per `gradient_accumulation_steps` micro-batches, each contributing one
        # backward pass per trained timestep (as ddpo-pytorch does).
        self.accelerator = Accelerator(
            mixed_precision=config.run.mixed_precision,
            gradient_accumulation_steps=t.gradient_accumulation_steps * self.steps_per_trajectory,
            cpu=policy.device.type == "cpu",
        )
        self.optimizer = self.accelerator.prepare_optimizer(self.optimizer)
        self.needs_reference = self.objective.uses_reference()
        self._reference_unet = None
        if self.needs_reference and not config.model.use_lora:
            self._reference_unet = copy.deepcopy(policy.denoiser).requires_grad_(False).eval()
        self.version = 0
        self.nonfinite_skipped = 0

    # ------------------------------------------------------------------ reference policy

    @contextmanager
    def _reference(self):
        """Run the policy as the frozen reference: LoRA adapters off, or the frozen full copy."""
        unet = self.policy.denoiser
        if self.config.model.use_lora:
            unet.disable_adapters()
            try:
                yield
            finally:
                unet.enable_adapters()
        else:
            self.policy.denoiser = self._reference_unet
            try:
                yield
            finally:
                self.policy.denoiser = unet

    # ------------------------------------------------------------------ one epoch of updates

    def _timestep_plan(self, rollout: Rollout, generator: torch.Generator) -> torch.Tensor:
        """(N, K) step positions to train on: a random subset of the stochastic steps (less the last
        `train.skip_final_steps`), per group."""
        steps = torch.nonzero(rollout.stochastic.cpu()).view(-1)
        if self.config.train.skip_final_steps:
            steps = steps[: len(steps) - self.config.train.skip_final_steps]
        k = self.steps_per_trajectory
        n_groups = int(rollout.group.max()) + 1
        perms = torch.stack(
            [steps[torch.randperm(len(steps), generator=generator)[:k]] for _ in range(n_groups)]
        )
        return perms[rollout.group.cpu()]  # edits of one input share their steps, as in SPIE

    def train(self, rollout: Rollout, generator: torch.Generator, progress: bool = False) -> dict[str, float]:
        """Run `train.num_inner_epochs` passes of the objective over a rollout batch.

        Args:
            rollout: N edits (whole groups, contiguous) carrying their signal: `advantages` (N,)
                for PPO, `ranks` (N,) for SPIE ranking; for SPO, win/lose pairs of one-step
                trajectories (`trainer.algo.spo.pair_batch`: `group` the pair, `ranks` 0 / 1).
            generator: drives the shuffles (seeded per epoch, so a resumed run repeats them).
        """
        return self.objective.learn(self, rollout, generator, progress)

    def passes(
        self, rollout: Rollout, generator: torch.Generator, progress: bool = False
    ) -> dict[str, float]:
        """The passes of an objective with per-step log-probs: shuffled micro-batches (whole groups
        for a `grouped` objective, single edits otherwise) and, for each, the trained steps of the
        timestep plan, each step's loss from `objective.loss`."""
        t, objective = self.config.train, self.objective
        ranked = objective.grouped
        if ranked and rollout.ranks is None:
            raise ValueError(f"{objective.name} needs the batch's ranks")
        if not ranked and rollout.advantages is None:
            raise ValueError(f"{objective.name} needs the batch's advantages")
        ranking = ranking_of(rollout.group, rollout.ranks) if ranked else None
        n = len(rollout)
        group_size = ranking.shape[1] if ranked else 1
        stats: dict[str, list[float]] = defaultdict(
            list, {"loss": [], "approx_kl": [], "clipfrac": [], "kl": []}
        )
        unet = self.policy.denoiser
        unet.train()
        total = t.num_inner_epochs * -(-n // t.batch_size) * self.steps_per_trajectory
        bar = tqdm(total=total, desc="training", leave=False, disable=not progress)
        for _ in range(t.num_inner_epochs):
            # Shuffle whole groups for the ranking objective, single edits for PPO.
            if ranked:
                order = ranking[torch.randperm(ranking.shape[0], generator=generator)]
                micro = order.split(t.batch_size // group_size)  # SPO's last may be smaller
            else:
                micro = torch.randperm(n, generator=generator).view(-1, t.batch_size)
            if objective.one_step:  # each item is the one step of its trajectory (SPO's pairs)
                plan = torch.zeros((n, 1), dtype=torch.long)
            else:
                plan = self._timestep_plan(rollout, generator)
            for mb in micro:
                index = mb.reshape(-1)
                batch = rollout.select(index)
                local_rank = torch.arange(index.numel()).view(mb.shape) if ranked else None
                for k in range(plan.shape[1]):
                    j = plan[index, k]
                    with self.accelerator.accumulate(unet), self.accelerator.autocast():
                        loss, info = self._step_loss(batch, j, local_rank)
                        self.backward(loss)
                    record(stats, loss, info)
                    bar.update()
        bar.close()
        unet.eval()
        self.version += 1
        out = {k: (sum(v) / len(v) if v else 0.0) for k, v in stats.items()}
        out["nonfinite_skipped"] = float(self.nonfinite_skipped)
        return out

    def _step_loss(self, batch, j, local_rank):
        t = self.config.train
        # A flow editor's KL is Flow-GRPO's, on the step's Gaussian means (`step_mean_kl`); the
        # others' is on the log-probs (`kl_penalty`).
        flow_kl = t.kl_coef > 0 and hasattr(self.policy, "step_output")
        step = self.policy.step_output if flow_kl else self.policy.step_log_prob
        out = step(batch, j)
        log_prob = out.log_prob if flow_kl else out
        ref = ref_out = None
        if self.needs_reference:
            with torch.no_grad(), self._reference():
                ref_out = step(batch, j)
            ref = ref_out.log_prob if flow_kl else ref_out
        loss, info = self.objective.loss(log_prob, ref, batch, j, local_rank)
        if t.kl_coef > 0:
            kl = step_mean_kl(out.mean, ref_out.mean, out.kl_std) if flow_kl else kl_penalty(log_prob, ref)
            loss = loss + t.kl_coef * kl
            info["kl"] = kl.detach()
        return loss, info

    def backward(self, loss: torch.Tensor) -> None:
        """Inside `accelerator.accumulate`: backpropagate a finite loss (a non-finite one is counted
        and skipped), and step once the accumulated micro-batches are complete."""
        if torch.isfinite(loss):
            self.accelerator.backward(loss)
        else:
            self.nonfinite_skipped += 1
        if self.accelerator.sync_gradients:
            self._apply_update()

    def _apply_update(self) -> None:
        """Clip and step, unless a gradient is non-finite (then skip the step and count it)."""
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        if any(not torch.isfinite(g).all() for g in grads):
            self.nonfinite_skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
            return
        self.accelerator.clip_grad_norm_(list(self.params.values()), self.config.train.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ state

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Name -> CPU copy of every trained tensor (what rollout workers and checkpoints need)."""
        return {name: p.detach().to("cpu", copy=True) for name, p in self.params.items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.params) - set(state))
        if missing:
            raise UserError(
                f"checkpoint lacks trained weights {missing[:3]} (was it made with another model config?)"
            )
        with torch.no_grad():
            for name, p in self.params.items():
                if state[name].shape != p.shape:
                    raise UserError(
                        f"checkpoint weight {name} has shape {tuple(state[name].shape)}, expected {tuple(p.shape)}"
                    )
                p.copy_(state[name].to(p.device, p.dtype))

    def optimizer_checkpoint(self) -> dict:
        """The optimizer's state, and under "objective" what an objective keeps between epochs that
        a resumed run needs: DiffusionNFT's old weights (`nft_old`, decay types 1 and 2) and its
        optimizer-step count (`nft_steps`, which sets the decay)."""
        state = self.optimizer.state_dict()
        kept = {}
        if getattr(self, "nft_old", None) is not None:
            kept["nft_old"] = {name: t.detach().to("cpu", copy=True) for name, t in self.nft_old.items()}
        if getattr(self, "nft_steps", None) is not None:
            kept["nft_steps"] = int(self.nft_steps)
        return {**state, "objective": kept} if kept else state

    def load_optimizer_checkpoint(self, state: dict) -> None:
        """Undo `optimizer_checkpoint` (a checkpoint without "objective" loads as before)."""
        state = dict(state)
        kept = state.pop("objective", {})
        self.optimizer.load_state_dict(state)
        if "nft_old" in kept:
            self.nft_old = {
                name: kept["nft_old"][name].to(p.device, p.dtype) for name, p in self.params.items()
            }
        if "nft_steps" in kept:
            self.nft_steps = int(kept["nft_steps"])
