"""The objective contract: what one RL method provides to the loop, the learner and the config.

An objective is a class registered under its `name` (`trainer.registry.register_objective`, or the
entry point group `spie.objectives` for other packages), constructed with the run's `Config`
(`self.config`). The loop, the learner and the config loader call only what is below; they never
test an objective's name. Shapes: N edits in a batch (whole groups of `sample.nb_gen`, contiguous),
T denoising steps, B items in a micro-batch.

A new objective must provide:
- `name`;
- `attach_signal(rollout, scores, stats)`: put its per-item signal on the scored batch, e.g.
  `rollout.advantages` (N,) float or `rollout.ranks` (N,) long (0 = best of its group), from
  `scores.values` {scorer: (N,) float64} and `rollout.group` (N,) long;
- `loss(log_prob, ref, batch, j, local_rank) -> (loss, info)`: the scalar loss of a micro-batch at
  one trained step: `log_prob` (B,) the step's log-prob under the current weights (with grad), `ref`
  (B,) under the frozen reference (None unless `uses_reference()`), `batch` the B items (their
  `log_probs` (B, T) at sampling, `advantages` / `ranks`), `j` (B,) long the step trained per item,
  `local_rank` (G, nb_gen) long, the batch rows of each group best first (None unless `grouped`);
  `info` maps metric names to 0-d tensors (averaged over the epoch into metrics.jsonl).

It may override: `check(need)` (its settings; `need(ok, message)` refuses), `divisible_batches`,
`summary()`, `start(rewards)`, `gather(...)` (how an epoch's batch is gathered: sample then score by
default), `training_batch(...)`, `uses_reference()`, `trained_steps(policy)`, `learn(...)` (a whole
pass over the batch, for objectives without per-step log-probs), `epoch_fields(record)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from sampler.rollout import Rollout
from trainer.algo.diagnostics import ratio_fields as ppo_ratio_fields
from trainer.config import Config
from trainer.pipeline import sample_and_score
from trainer.rewards.scores import Scores


@dataclass
class Gathered:
    """One epoch's batch as gathered: the edits and their scores (for the metrics and the signal),
    the seconds spent, and what the objective learned or will learn from."""

    rollout: Rollout
    scores: Scores
    times: dict[str, float] = field(default_factory=dict)
    # Update numbers when the objective learned while gathering (reward backpropagation); then the
    # loop does not call the learner.
    learned: dict[str, float] | None = None
    # A training batch of the objective's own (SPO's step-wise pairs), used instead of the edits.
    pairs: Rollout | None = None


class Objective:
    """Base class of the objectives (see the module docstring for the contract)."""

    name: ClassVar[str] = ""
    # The learner's micro-batches hold whole groups, and `loss` gets each group's rows by rank.
    grouped: ClassVar[bool] = False
    # Each item of the training batch is a one-step trajectory (its step 0 is the one trained).
    one_step: ClassVar[bool] = False
    # The epoch's edits per process must divide into train.batch_size x gradient_accumulation_steps.
    divisible_batches: ClassVar[bool] = True
    # With sample.pipeline=async, sampling batches are scored on a background thread as sampled.
    background_scoring: ClassVar[bool] = True
    # The learner reads instructions itself (it samples, as AlignProp does), so a Ray learner keeps
    # the editor's text encoders; otherwise it trains on recorded embeddings and drops them.
    learner_reads_text: ClassVar[bool] = False

    def __init__(self, config: Config) -> None:
        self.config = config

    # ------------------------------------------------------------------ config

    def check(self, need) -> None:
        """Refuse inconsistent settings of this objective: `need(ok, message)`."""

    def summary(self) -> str | None:
        """The sizes line printed at start (None: the default one)."""
        return None

    # ------------------------------------------------------------------ one epoch

    def start(self, rewards) -> None:
        """Once per run, before the first epoch, with the run's rewards (`score(rollout)`)."""

    def gather(self, engine, rewards, shards: list, generator: torch.Generator, progress: bool, scorer):
        """The epoch's batch: sample every shard, then score it (`trainer.pipeline`). Returns `Gathered`."""
        rollout, scores, times = sample_and_score(engine, rewards, shards, self.config, progress, scorer)
        return Gathered(rollout, scores, times)

    def training_batch(self, gathered: Gathered, rollout: Rollout, scores: Scores, stats) -> Rollout:
        """What the learner trains on: the kept edits, with the signal attached."""
        if len(rollout):
            self.attach_signal(rollout, scores, stats)
        return rollout

    def attach_signal(self, rollout: Rollout, scores: Scores, stats) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ the learner

    def uses_reference(self) -> bool:
        """Whether `loss` needs the frozen reference's log-probs (`ref`)."""
        return self.config.train.kl_coef > 0

    def trained_steps(self, policy) -> int:
        """Steps trained per trajectory: the stochastic ones (only they have a log-prob), less
        `train.skip_final_steps`, at most `train.timestep_fraction` of them."""
        t = self.config.train
        n_stochastic = int(policy.sched.step_is_stochastic().sum()) - t.skip_final_steps
        return min(self.config.train_timesteps, n_stochastic)

    def learn(self, learner, rollout: Rollout, generator: torch.Generator, progress: bool) -> dict:
        """`train.num_inner_epochs` passes over the batch (`Learner.passes` calls `loss`)."""
        return learner.passes(rollout, generator, progress)

    def loss(self, log_prob, ref, batch: Rollout, j, local_rank) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    # ------------------------------------------------------------------ metrics

    def epoch_fields(self, record: dict[str, Any]) -> list[str]:
        """This objective's parts of the epoch line, from the epoch's metrics record."""
        return self.update_fields(record) + self.group_fields(record)

    def update_fields(self, record: dict[str, Any]) -> list[str]:
        return ppo_ratio_fields(record)

    def group_fields(self, record: dict[str, Any]) -> list[str]:
        if "groups_zero_var" in record:
            return [f"zero-var groups={record['groups_zero_var']:.0%}"]
        return []


def ratio_fields(record: dict[str, Any]) -> list[str]:
    """The ranking objectives' line: how much of the ratio is clamped, and their agreement."""
    if "pref_agreement" in record:
        return [
            f"clamped={record['clamped_frac']:.0%} |log r|={record['abs_log_ratio']:.2g} "
            f"agree={record['pref_agreement']:.2f}"
        ]
    return ppo_ratio_fields(record)
