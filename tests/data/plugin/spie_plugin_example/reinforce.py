"""Plain REINFORCE with a per-group mean baseline, as a spie objective (`train.objective: reinforce`).

Signal: each edit's reward minus the mean reward of its group (the edits of one input), (N,).
Loss at one trained step: minus the mean of advantage x log-prob over the micro-batch.
"""

from __future__ import annotations

import torch

from trainer.algo.signals import ppo_rewards
from trainer.objectives.base import Objective


class Reinforce(Objective):
    name = "reinforce"

    def check(self, need) -> None:
        need(
            self.config.sample.nb_gen >= 2, "train.objective=reinforce needs sample.nb_gen >= 2 (a baseline)"
        )

    def attach_signal(self, rollout, scores, stats) -> None:
        reward = ppo_rewards(self.config.reward, scores).double()
        advantages = torch.empty_like(reward)
        for g in torch.unique(rollout.group):
            sel = rollout.group == g
            advantages[sel] = reward[sel] - reward[sel].mean()
        rollout.advantages = advantages.float()

    def loss(self, log_prob, ref, batch, j, local_rank):
        advantages = batch.advantages.to(log_prob.device)
        loss = -(advantages * log_prob).mean()
        return loss, {"reinforce_adv_abs": advantages.abs().mean()}
