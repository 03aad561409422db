"""`train.objective: spie_ranking`: SPIE's Plackett-Luce likelihood of each group's best-to-worst
order, on D3PO-style clamped ratios to a frozen reference. Settings: `train.beta`, `eps`,
`score_alpha`, `rec_lambda` (`trainer.config.train.RankingSettings`)."""

from __future__ import annotations

from sampler.rollout import Rollout
from trainer.algo.diagnostics import ranking_diagnostics
from trainer.algo.objectives import plackett_luce_loss, ranking_from_scores, ranks_of
from trainer.algo.signals import spie_signals
from trainer.objectives.base import Objective, ratio_fields
from trainer.registry import register_objective
from trainer.rewards.scores import Scores


@register_objective
class SpieRanking(Objective):
    name = "spie_ranking"
    grouped = True

    def check(self, need) -> None:
        s, t = self.config.sample, self.config.train
        need(
            s.nb_gen >= 2,
            f"train.objective=spie_ranking ranks edits: sample.nb_gen must be >= 2, got {s.nb_gen}",
        )
        need(
            t.batch_size % s.nb_gen == 0,
            f"train.objective=spie_ranking trains on whole groups: train.batch_size ({t.batch_size}) "
            f"must be a multiple of sample.nb_gen ({s.nb_gen})",
        )

    def attach_signal(self, rollout: Rollout, scores: Scores, stats) -> None:
        """`rollout.ranks` (N,): each edit's place in its group's ranking (structural and semantic
        scores, weighted by `train.score_alpha`)."""
        t = self.config.train
        # Standardised over each sampling batch gathered from every learner, as SPIE over its processes.
        per_process = self.config.sample.num_batches_per_epoch
        structural, semantic = spie_signals(self.config.reward, t, scores, rollout, per_process)
        ranking = ranking_from_scores(structural, semantic, rollout.group, t.score_alpha)
        rollout.ranks = ranks_of(ranking, len(rollout))

    def uses_reference(self) -> bool:
        return True

    def loss(self, log_prob, ref, batch: Rollout, j, local_rank):
        t = self.config.train
        loss = plackett_luce_loss(log_prob, ref, local_rank, t.beta, t.eps)
        return loss, ranking_diagnostics(log_prob.detach(), ref, local_rank, t.eps)

    def update_fields(self, record) -> list[str]:
        return ratio_fields(record)
