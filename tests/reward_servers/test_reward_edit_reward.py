"""The EditReward-style scalar reward model on a tiny seeded Qwen2.5-VL with seeded MLP heads: the
heads read the last token's final hidden state (recomputed here by hand), the heads reduce by min,
batch invariance, and one-line errors for a missing head file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reward_servers.base import ScoreBatch, build_scorer
from reward_servers.edit_reward import save_tiny


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = save_tiny(str(tmp_path_factory.mktemp("edit_reward")))
    yield build_scorer("edit_reward", model_id=folder, dtype="float32", max_pixels=None)
    torch.set_num_threads(threads)


def _batch(n: int = 3) -> ScoreBatch:
    rng = np.random.default_rng(0)
    sources = [rng.integers(0, 256, (40 + 4 * k, 48, 3), dtype=np.uint8) for k in range(n)]
    edits = [rng.integers(0, 256, (48, 44, 3), dtype=np.uint8) for _ in range(n)]
    return ScoreBatch(edits, sources, ["make it snowy", "add a red hat", "keep the sky blue"][:n])


def test_heads_read_the_last_hidden_state(scorer, tmp_path):
    from safetensors.torch import load_file

    batch = _batch()
    result = scorer.score(batch)
    inputs = scorer.build_inputs(list(batch.sources), list(batch.edited), list(batch.instructions))
    assert inputs["attention_mask"][:, -1].all()  # left padding: the last position is every item's
    with torch.no_grad():
        hidden = scorer.model(**inputs, output_hidden_states=True).hidden_states[-1][:, -1].float()
    state = load_file(f"{scorer.model_id}/reward_heads.safetensors")
    by_hand = {}
    for head in ("instruction", "quality"):  # Linear -> ReLU -> Linear (no bias), as saved
        h = torch.relu(hidden @ state[f"{head}.0.weight"].T + state[f"{head}.0.bias"])
        by_hand[head] = (h @ state[f"{head}.2.weight"].T)[:, 0].double().numpy()
        np.testing.assert_allclose([d[head] for d in result.details], by_hand[head], atol=1e-5)
    np.testing.assert_allclose(
        result.scores, np.minimum(by_hand["instruction"], by_hand["quality"]), atol=1e-5
    )
    assert by_hand["instruction"].std() > 0  # the items get different rewards


def test_batch_invariance_and_mean_reduction(scorer):
    batch = _batch()
    result = scorer.score(batch)
    for i in range(3):
        one = scorer.score(ScoreBatch([batch.edited[i]], [batch.sources[i]], [batch.instructions[i]]))
        np.testing.assert_allclose(one.scores[0], result.scores[i], atol=1e-5, rtol=0)
    mean = build_scorer(
        "edit_reward", model_id=scorer.model_id, dtype="float32", reduction="mean", max_pixels=None
    )
    got = mean.score(batch)
    expected = [(d["instruction"] + d["quality"]) / 2 for d in result.details]
    np.testing.assert_allclose(got.scores, expected, atol=1e-6)


def test_missing_heads_fail_in_one_line(scorer, tmp_path):
    with pytest.raises(FileNotFoundError, match="head_path"):
        build_scorer("edit_reward", model_id=scorer.model_id, head_path=str(tmp_path / "none.safetensors"))
    with pytest.raises(ValueError, match="no weights for head 'aesthetics'"):
        build_scorer("edit_reward", model_id=scorer.model_id, heads=["instruction", "aesthetics"])


def test_an_overlong_instruction_fails_its_item_alone(scorer):
    """Issue 26 #6 for this judge too: bytes capped before tokenising, then tokens; one line each."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    instructions = ["add a hat " * 6554, "add a hat", "add a hat " * 400]  # 64 KiB; fine; 4000 bytes
    result = scorer.score(ScoreBatch(images, images, instructions))
    assert result.errors[0] == "instruction of 65540 bytes exceeds max_instruction_bytes 8192"
    assert result.errors[1] is None and np.isfinite(result.scores[1])
    assert result.errors[2] == "instruction of 1200 tokens exceeds max_instruction_tokens 1024"
