"""Checks shared by the trainer tests of more than one editor family."""

from __future__ import annotations

import pytest
import torch


def _lora_update_moves_only_lora(config, targets: tuple[str, ...]):
    """Build the policy and learner from `config` (LoRA on), check the LoRA names cover `targets`,
    that recorded log-probs recompute (ratio 1), and that one update moves LoRA and nothing else.
    Returns the policy."""
    from trainer.algo.objectives import group_advantages
    from trainer.data.inputs import load_inputs
    from trainer.engine.learner import Learner
    from trainer.engine.policy import build_policy

    policy = build_policy(config)
    learner = Learner(config, policy)
    names = list(learner.params)
    assert names and all(n.startswith("transformer.") and "lora_" in n for n in names)
    for target in targets:
        assert any(target in n for n in names), target
    inputs = load_inputs(config.data, config.model.resolution, seed=0)
    with policy.eval_mode():
        r = policy.rollout(
            inputs.sources[:4], inputs.instructions[:4], nb_gen=2, generator=torch.Generator().manual_seed(0)
        )
    again = torch.stack([policy.step_log_prob(r, j) for j in range(r.log_probs.shape[1])], dim=1)
    torch.testing.assert_close(again, r.log_probs, atol=1e-5, rtol=0)
    frozen = {n: p.detach().clone() for n, p in policy.denoiser.named_parameters() if "lora_" not in n}
    before = learner.trainable_state()
    r.item_ids = [f"i{i}" for i in range(len(r))]
    r.advantages = group_advantages(r.images.mean(dim=(1, 2, 3)), r.group).float()
    learner.train(r, torch.Generator().manual_seed(0))
    after = learner.trainable_state()
    assert any(not torch.equal(before[n], after[n]) for n in names)
    assert all(torch.equal(p, frozen[n]) for n, p in policy.denoiser.named_parameters() if "lora_" not in n)
    return policy


@pytest.fixture
def lora_update_moves_only_lora():
    """The check above, for the flow editors' LoRA tests."""
    return _lora_update_moves_only_lora
