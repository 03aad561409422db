"""`train.objective: ppo`: DDPO's PPO-clip on per-step likelihood ratios, with group-normalised
advantages (GRPO). Settings: `train.clip_range`, `adv_clip_max`, `min_group_size`, `advantage_scale`
(`trainer.config.train.PPOSettings`)."""

from __future__ import annotations

import torch

from sampler.rollout import Rollout
from trainer.algo.objectives import ppo_clip_loss
from trainer.algo.signals import attach_group_advantages
from trainer.objectives.base import Objective
from trainer.registry import register_objective
from trainer.rewards.scores import Scores


@register_objective
class PPO(Objective):
    name = "ppo"

    def attach_signal(self, rollout: Rollout, scores: Scores, stats) -> None:
        attach_group_advantages(self.config, rollout, scores, stats)

    def loss(self, log_prob, ref, batch: Rollout, j, local_rank):
        t = self.config.train
        old = batch.log_probs[torch.arange(len(batch)), j].to(log_prob.device)
        return ppo_clip_loss(
            log_prob, old, batch.advantages.to(log_prob.device), t.clip_range, t.adv_clip_max
        )
