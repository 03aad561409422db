"""`train.objective: spo`: step-by-step preference optimisation. Each epoch samples chains with a
pool of candidates per step (`trainer.stepwise`, `trainer.engine.pools`, `sampler.step_pool`), the
scorers judge every candidate, and the win/lose pairs past `train.spo.threshold` are the training
batch: one-step trajectories, a DPO-style loss on clamped ratios to the frozen reference.
Settings: `train.spo` (`trainer.config.train.SPOConfig`) and `train.eps`."""

from __future__ import annotations

from sampler.rollout import Rollout
from trainer.algo.diagnostics import ranking_diagnostics
from trainer.algo.spo import spo_loss
from trainer.objectives.base import Gathered, Objective, ratio_fields
from trainer.registry import register_objective
from trainer.rewards.scores import Scores
from trainer.stepwise import sample_spo


@register_objective
class SPO(Objective):
    name = "spo"
    grouped = True  # a pair is a group of two, ranked
    one_step = True
    divisible_batches = False  # the pairs per epoch vary

    def check(self, need) -> None:
        """Its pools, and what its variable number of pairs per epoch allows."""
        config = self.config
        t, o = config.train, config.train.spo
        checks = (
            (o.pool_size >= 2, f"train.spo.pool_size must be >= 2, got {o.pool_size}"),
            (0 <= o.threshold < 1, f"train.spo.threshold must be in [0, 1), got {o.threshold}"),
            (o.beta > 0, f"train.spo.beta must be > 0, got {o.beta}"),
            (o.judge_steps >= 1, f"train.spo.judge_steps must be >= 1, got {o.judge_steps}"),
            (
                0 <= o.start_step < config.sample.num_steps,
                f"train.spo.start_step must be in [0, sample.num_steps), got {o.start_step}",
            ),
            (
                t.batch_size % 2 == 0,
                f"train.objective=spo trains on pairs: train.batch_size must be even, got {t.batch_size}",
            ),
            (
                t.gradient_accumulation_steps == 1,
                "train.objective=spo: the pairs per epoch vary, so train.gradient_accumulation_steps must be 1",
            ),
            (
                config.sample.nb_gen == 1,
                "train.objective=spo samples one chain per input (its pools replace nb_gen): set sample.nb_gen: 1",
            ),
            (
                config.ray.num_learners == 1,
                "train.objective=spo trains on one learner (its pairs per epoch vary, so data-parallel "
                f"shares would differ): set ray.num_learners: 1, got {config.ray.num_learners}",
            ),
        )
        for ok, message in checks:
            need(ok, message)

    def summary(self) -> str:
        c, o = self.config, self.config.train.spo
        return (
            f"inputs per epoch = {c.batches_per_epoch * c.sample.batch_size}, "
            f"SPO pools of {o.pool_size} candidates at each stochastic step from step {o.start_step}, "
            f"pairs past threshold {o.threshold:g} trained in micro-batches of {c.train.batch_size // 2}"
        )

    def gather(self, engine, rewards, shards, generator, progress, scorer) -> Gathered:
        """Step pools judged while the chains go on; the pairs are the training batch."""
        rollout, scores, pairs, info = sample_spo(engine, rewards, shards, self.config, progress)
        return Gathered(rollout, scores, info, pairs=pairs)

    def training_batch(self, gathered: Gathered, rollout: Rollout, scores: Scores, stats) -> Rollout:
        return gathered.pairs  # they carry their ranks (0 the win, 1 the loss)

    def attach_signal(self, rollout: Rollout, scores: Scores, stats) -> None:
        """Unused: SPO's pairs are ranked when formed (`trainer.algo.spo.pair_batch`)."""

    def uses_reference(self) -> bool:
        return True

    def loss(self, log_prob, ref, batch: Rollout, j, local_rank):
        t = self.config.train
        loss = spo_loss(log_prob, ref, local_rank, t.spo.beta, t.eps)
        return loss, ranking_diagnostics(log_prob.detach(), ref, local_rank, t.eps)

    def epoch_fields(self, record) -> list[str]:
        # SPO's groups are single chains: no zero-variance groups to report.
        pairs = [
            f"pairs={record['spo.pairs']:.0f}/{record['spo.pools']:.0f} gap={record['spo.gap_mean']:.3g}"
        ]
        return pairs + ratio_fields(record)
