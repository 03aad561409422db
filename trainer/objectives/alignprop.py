"""`train.objective: alignprop`: reward backpropagation. Each sampling batch is sampled with
gradients through the last K steps and scored by the scorers' differentiable forms; minus the
weighted reward is backpropagated (`trainer.engine.alignprop`, `trainer.algo.alignprop`), so the
epoch learns while it gathers. Settings: `train.backprop_min_steps`, `backprop_max_steps`,
`gradient_checkpointing` (`trainer.config.train.AlignPropSettings`)."""

from __future__ import annotations

import time

from trainer.objectives.base import Gathered, Objective
from trainer.registry import register_objective
from trainer.rewards.differentiable import make_gradient_rewards


@register_objective
class AlignProp(Objective):
    learner_reads_text = True  # it samples on the learner
    name = "alignprop"
    divisible_batches = False
    background_scoring = False  # the scores come after the epoch's learning

    def check(self, need) -> None:
        """A K range within the steps, whole optimizer steps per epoch (per learner with Ray), no
        fp16 (no loss scaler)."""
        config = self.config
        t, s = config.train, config.sample
        hi = s.num_steps if t.backprop_max_steps == 0 else t.backprop_max_steps
        need(
            1 <= t.backprop_min_steps <= hi <= s.num_steps,
            f"train.backprop_min_steps ({t.backprop_min_steps}) and train.backprop_max_steps "
            f"({t.backprop_max_steps}) must satisfy 1 <= min <= max <= sample.num_steps ({s.num_steps}); max 0: all",
        )
        need(
            s.num_batches_per_epoch % t.gradient_accumulation_steps == 0,
            f"train.objective=alignprop: sample.num_batches_per_epoch ({s.num_batches_per_epoch}) must be a "
            f"multiple of train.gradient_accumulation_steps ({t.gradient_accumulation_steps})",
        )
        need(t.kl_coef == 0, "train.kl_coef: alignprop has no per-step KL penalty (set it to 0)")
        need(
            config.run.mixed_precision != "fp16",
            "train.objective=alignprop: run.mixed_precision=fp16 has no loss scaler here; use bf16 or no",
        )

    def summary(self) -> str:
        c, t = self.config, self.config.train
        k_max = t.backprop_max_steps or c.sample.num_steps
        return (
            f"images per epoch = {c.images_per_epoch}, AlignProp: one backward pass per sampling "
            f"batch of {c.sample.batch_size * c.sample.nb_gen}, "
            f"{c.batches_per_epoch // t.gradient_accumulation_steps} optimizer steps per epoch, "
            f"K drawn from {t.backprop_min_steps}..{k_max} of {c.sample.num_steps} steps"
        )

    def start(self, rewards) -> None:
        # The scorers' differentiable forms (refused, naming them, when one has none).
        self.reward = make_gradient_rewards(rewards)

    def gather(self, engine, rewards, shards, generator, progress, scorer) -> Gathered:
        """Sampling, differentiable scoring and learning in one pass; then the scorers' own scores
        and details, for the metrics."""
        t0 = time.perf_counter()
        rollout, _, learned = engine.learn_by_reward(shards, self.reward, generator, progress)
        ts = time.perf_counter()
        scores = rewards.score(rollout)
        times = {"time_sampling_s": ts - t0, "time_scoring_s": time.perf_counter() - ts}
        return Gathered(rollout, scores, times, learned=learned)

    def update_fields(self, record) -> list[str]:
        parts = super().update_fields(record)
        if "backprop_steps" in record:
            parts.append(f"loss={record['loss']:.4g} K={record['backprop_steps']:.1f}")
        return parts
