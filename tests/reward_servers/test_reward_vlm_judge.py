"""The VLM judge's rating and VIEScore modes on tiny seeded Qwen2-VL and Qwen3-VL models: the
published formulas on fixed numbers, one forward pass for two-token ratings, batch invariance, the
prompt version in Info and in the details, and one-line errors for bad prompt files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reward_helpers import DigitTokenizer, judge_batch, score_served_judge

from reward_servers.base import ScoreBatch, build_scorer
from reward_servers.errors import UserError
from reward_servers.vlm_prompts import DEFAULT_PROMPTS, RatingReader, load_prompts

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread, restored after


def test_rating_matches_edit_r1_formula_on_fixed_logits():
    logits = torch.linspace(-3, 3, 128).repeat(2, 1)
    logits[1, 100:106] = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5, -0.5])
    reader = RatingReader(DigitTokenizer(), max_rating=5)
    assert reader.prefix is None
    ours, _ = reader.expected(logits)
    # PKU-YuanGroup/Edit-R1, reward_server/reward_server_transformers.py, `_transformers_evaluate`
    # (score_idx at line 21, the expectation at lines 93-101):
    #     first_token_logits = outputs.logits[0][-1, score_idx]
    #     probs = torch.softmax(first_token_logits, dim=-1)
    #     score_prob = torch.sum(probs * torch.arange(len(score_idx))).item() / max_score
    score_idx, max_score = list(range(100, 106)), 5
    for row in range(2):
        probs = torch.softmax(logits[row, score_idx], dim=-1)
        reference = torch.sum(probs * torch.arange(len(score_idx))).item() / max_score
        assert ours[row].item() / 5 == pytest.approx(reference, abs=1e-6)


def test_two_token_rating_splits_the_shared_first_token():
    reader = RatingReader(DigitTokenizer(), max_rating=10)
    assert reader.prefix == 101  # "10" -> "1", "0"
    answer, after = torch.full((1, 128), -30.0), torch.full((1, 128), -30.0)
    answer[0, 101], answer[0, 107] = 0.0, 0.0  # p("1") = p("7") = 1/2
    after[0, 100] = math.log(3.0)  # after "1": q("0") = 3/4 of the rest
    after[0, 50] = 0.0
    rating, mass = reader.expected(answer, after)
    # P(10) = 1/2 * 3/4, P(1) = 1/2 * 1/4, P(7) = 1/2
    assert rating.item() == pytest.approx(10 * 0.375 + 1 * 0.125 + 7 * 0.5, abs=1e-4)
    assert mass.item() == pytest.approx(1.0, abs=1e-4)


def test_appended_token_leaves_the_answer_slot_unchanged(vlm_folders):
    """Causality: the answer slot's logits with "1" appended equal a pass without it."""
    scorer = build_scorer("vlm_judge", model_id=vlm_folders["qwen2_vl"], mode="viescore", max_pixels=None)
    batch = judge_batch(2)
    inputs = scorer.build_inputs(batch.sources, batch.edited, batch.instructions)
    assert (inputs["input_ids"][:, -1] == scorer.reader.prefix).all()
    answer, _ = scorer._forward(inputs)
    trimmed = {**inputs}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        trimmed[key] = inputs[key][:, :-1]
    plain = scorer.model(**trimmed, use_cache=False).logits[:, -1].float()
    torch.testing.assert_close(answer, plain.detach(), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("family", "mode"),
    [("qwen2_vl", "yes_no"), ("qwen3_vl", "rating"), ("qwen2_vl", "viescore"), ("qwen3_vl", "viescore")],
)
def test_modes_are_batch_invariant(vlm_folders, family, mode):
    scorer = build_scorer("vlm_judge", model_id=vlm_folders[family], mode=mode, max_pixels=None)
    batch = judge_batch(4)
    result = scorer.score(batch)
    assert np.isfinite(result.scores).all(), result.errors
    for i in range(4):
        alone = scorer.score(ScoreBatch([batch.edited[i]], [batch.sources[i]], [batch.instructions[i]]))
        np.testing.assert_allclose(alone.scores[0], result.scores[i], atol=1e-5, rtol=0)
    assert all(d["prompt_version"] == 1.0 for d in result.details)
    top = {"yes_no": 1.0, "rating": 1.0, "viescore": 10.0}[mode]
    assert ((result.scores >= 0) & (result.scores <= top)).all()


def test_viescore_is_the_geometric_mean_of_the_minima(vlm_folders):
    scorer = build_scorer("vlm_judge", model_id=vlm_folders["qwen3_vl"], mode="viescore", max_pixels=None)
    result = scorer.score(judge_batch(3, seed=1))
    for score, d in zip(result.scores, result.details, strict=True):
        # TIGER-AI-Lab/VIEScore, viescore/__init__.py, `VIEScore.evaluate`:
        #     SC_score = min(results_dict['SC']['score'])
        #     PQ_score = min(results_dict['PQ']['score'])
        #     O_score = math.sqrt(SC_score * PQ_score)
        sc_score = min(d["sc.success"], d["sc.overediting"])
        pq_score = min(d["pq.naturalness"], d["pq.artifacts"])
        assert d["sc"] == sc_score and d["pq"] == pq_score
        assert score == pytest.approx(math.sqrt(sc_score * pq_score), abs=1e-12)
        assert all(0 <= d[k] <= 10 for k in ("sc", "pq"))


def test_prompt_version_travels_in_info_and_details(vlm_folders, serve, tmp_path):
    prompts = tmp_path / "p.yaml"
    text = DEFAULT_PROMPTS.read_text().replace("version: 1", "version: 7")
    prompts.write_text(text)
    scorer = build_scorer(
        "vlm_judge",
        model_id=vlm_folders["qwen2_vl"],
        mode="rating",
        prompts_path=str(prompts),
        max_pixels=None,
    )
    assert scorer.version.endswith("prompts7")
    response = score_served_judge(serve, scorer)
    assert response.version == scorer.version
    assert [r.details["prompt_version"] for r in response.results] == [7.0, 7.0]


def test_bad_prompt_files_fail_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrating: {images: [source, edit]}\n")
    with pytest.raises(UserError, match="needs a `text`"):
        load_prompts("rating", bad)
    bad.write_text("rating: {text: x}\n")
    with pytest.raises(UserError, match="integer `version`"):
        load_prompts("rating", bad)
    with pytest.raises(UserError, match="mode must be one of"):
        load_prompts("stars")
    with pytest.raises(UserError, match="no prompts for mode 'viescore'"):
        bad.write_text("version: 2\nrating: {text: '{instruction}'}\n")
        load_prompts("viescore", bad)
