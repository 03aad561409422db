"""Ray learners drop the editor's text encoders (they train on the embeddings the rollout recorded):
on each editor family's tiny model, a learner without them takes exactly the update of one with them,
and a call that would need them fails in one line naming the encoder."""

from __future__ import annotations

import pytest
import torch

from trainer.algo.objectives import group_advantages
from trainer.data.inputs import load_inputs
from trainer.engine.learner import Learner
from trainer.engine.policy import DroppedTextEncoder, build_policy, drop_text_encoders
from trainer.registry import make_objective


def _learner(config) -> Learner:
    torch.manual_seed(0)  # the same LoRA initialisation for both
    return Learner(config, build_policy(config))


@pytest.mark.parametrize(
    "preset,encoders",
    [
        ("configs/tiny.yaml", ["text_encoder"]),
        ("configs/tiny-kontext.yaml", ["text_encoder", "text_encoder_2"]),
        ("configs/tiny-qwen-edit.yaml", ["text_encoder"]),
    ],
)
def test_a_learner_without_text_encoders_takes_the_same_update(editor_config, preset, encoders):
    config = editor_config(preset, "sample.batch_size=4", "train.batch_size=4")
    kept, dropped = _learner(config), _learner(config)
    sizes = {
        name: sum(t.numel() * t.element_size() for t in (*m.parameters(), *m.buffers()))
        for name in encoders
        for m in [getattr(kept.policy.c, name)]
    }
    assert drop_text_encoders(dropped.policy) == sum(sizes.values()) > 0
    assert all(isinstance(getattr(dropped.policy.c, name), DroppedTextEncoder) for name in encoders)
    assert drop_text_encoders(dropped.policy) == 0  # once is enough

    inputs = load_inputs(config.data, config.model.resolution, seed=0)
    with kept.policy.eval_mode():
        r = kept.policy.rollout(
            inputs.sources[:4], inputs.instructions[:4], nb_gen=2, generator=torch.Generator().manual_seed(0)
        )
    r.item_ids = [f"i{i}" for i in range(len(r))]
    r.advantages = group_advantages(r.images.mean(dim=(1, 2, 3)), r.group).float()
    a = kept.train(r, torch.Generator().manual_seed(1))
    b = dropped.train(r, torch.Generator().manual_seed(1))
    assert a["loss"] == b["loss"]
    after_a, after_b = kept.trainable_state(), dropped.trainable_state()
    assert any(not torch.equal(after_a[n], p.detach().cpu()) for n, p in _learner(config).params.items())
    for name in after_a:
        assert torch.equal(after_a[name], after_b[name]), name

    with pytest.raises(RuntimeError, match=f"{encoders[0]} was dropped from this learner"):
        getattr(dropped.policy.c, encoders[0])(torch.zeros(1, 2, dtype=torch.long))


def test_only_an_objective_that_samples_on_the_learner_keeps_them(tiny_config):
    reads = {
        name: make_objective(tiny_config(f"train.objective={name}")).learner_reads_text
        for name in ("ppo", "spie_ranking", "nft", "alignprop")
    }
    assert reads == {"ppo": False, "spie_ranking": False, "nft": False, "alignprop": True}
