"""The VLM judge's `editscore` mode (EditScore's generative scoring) on tiny seeded Qwen2-VL and
Qwen3-VL models: labels of one and two digits read from logits, EditScore's formula on fixed numbers,
batch invariance and determinism with generated reasoning, the prompt version in Info and in the
details, one-line errors for bad prompt files, and the real checkpoints (marked `weights`)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reward_helpers import DigitTokenizer, judge_batch, score_served_judge

from reward_servers.base import ScoreBatch, build_scorer
from reward_servers.editscore import EDITSCORE_PROMPTS, DigitReader, editscore_overall, load_editscore_prompts
from reward_servers.errors import UserError
from reward_servers.vlm_prompts import RatingReader

pytestmark = pytest.mark.usefixtures("one_thread")  # torch on one thread, restored after


def judge(folder: str, **kwargs):
    return build_scorer(
        "vlm_judge", model_id=folder, mode="editscore", max_pixels=None, max_new_tokens=6, **kwargs
    )


def test_digit_reader_matches_the_rating_reader_on_0_to_10():
    torch.manual_seed(0)
    answer, after = torch.randn(3, 128) * 3, torch.randn(3, 128) * 3
    ours = DigitReader(DigitTokenizer(), 10)
    assert ours.branches == [101]
    probs, mass = ours.distribution(answer, {101: after})
    theirs, their_mass = RatingReader(DigitTokenizer(), 10).expected(answer, after)
    torch.testing.assert_close(ours.expected(probs), theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(mass, their_mass, atol=1e-6, rtol=0)


def test_digit_reader_reads_two_digit_labels_up_to_25():
    reader = DigitReader(DigitTokenizer(), 25)
    assert reader.branches == [101, 102]  # "1x" and "2x" labels
    answer = torch.full((2, 128), -30.0)
    answer[0, 101] = 0.0  # row 0: "1", then "7": the label 17
    answer[1, 101], answer[1, 102] = 0.0, 0.0  # row 1: "1" or "2", each 1/2
    after1, after2 = torch.full((2, 128), -30.0), torch.full((2, 128), -30.0)
    after1[0, 107] = 0.0
    after1[1, 50] = 0.0  # after "1": no digit, so the label is 1
    after2[1, 109], after2[1, 103] = 0.0, 0.0  # after "2": "9" (29 is off the scale) or "3" (23)
    probs, mass = reader.distribution(answer, {101: after1, 102: after2})
    expected = reader.expected(probs)
    assert expected[0].item() == pytest.approx(17.0, abs=1e-4)
    assert mass[0].item() == pytest.approx(1.0, abs=1e-4)
    # P(1) = 1/2, P(23) = 1/2 * 1/2, P(2) = 1/2 * (1 - q("0".."5")) = 1/4; 29 is not a label.
    assert expected[1].item() == pytest.approx(0.5 * 1 + 0.25 * 23 + 0.25 * 2, abs=1e-4)
    assert probs.shape == (2, 26) and torch.allclose(probs.sum(-1), torch.ones(2))


def test_overall_matches_editscore_formula_on_fixed_numbers():
    sc_raw, pq_raw, score_range = [19.0, 22.5], [24.0, 13.25], 25
    # VectorSpaceLab/EditScore, editscore/__init__.py, `EditScore.evaluate` (lines 129-131 at 6e0f1b9):
    #     SC_score = min(SC_dict['score']) / (self.score_range / 10)
    #     PQ_score = min(PQ_dict['score']) / (self.score_range / 10)
    #     O_score = math.sqrt(SC_score * PQ_score)
    SC_score = min(sc_raw) / (score_range / 10)
    PQ_score = min(pq_raw) / (score_range / 10)
    O_score = math.sqrt(SC_score * PQ_score)
    assert editscore_overall(sc_raw, pq_raw, score_range) == pytest.approx(
        (SC_score, PQ_score, O_score), abs=1e-12
    )


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_editscore_is_batch_invariant_and_deterministic(vlm_folders, family):
    scorer = judge(vlm_folders[family])
    batch = judge_batch(3)
    result = scorer.score(batch)
    assert np.isfinite(result.scores).all(), result.errors
    for i in range(3):
        alone = scorer.score(ScoreBatch([batch.edited[i]], [batch.sources[i]], [batch.instructions[i]]))
        np.testing.assert_allclose(alone.scores[0], result.scores[i], atol=1e-5, rtol=0)
        assert alone.texts[0] == result.texts[i]
    again = scorer.score(batch)
    np.testing.assert_array_equal(again.scores, result.scores)
    for score, d, text in zip(result.scores, result.details, result.texts, strict=True):
        assert set(text) == {"sc_reasoning", "pq_reasoning"} and all(
            isinstance(t, str) for t in text.values()
        )
        sc = min(d["sc.success"], d["sc.overediting"])
        pq = min(d["pq.naturalness"], d["pq.artifacts"])
        assert (d["sc"], d["pq"]) == pytest.approx((sc, pq), abs=1e-12)
        assert score == pytest.approx(math.sqrt(sc * pq), abs=1e-12) and 0 <= score <= 10
        assert 0 < d["label_mass"] <= 1 and d["prompt_version"] == 1.0


def test_editscore_version_in_info_and_details(vlm_folders, serve, tmp_path):
    prompts = tmp_path / "p.yaml"
    prompts.write_text(EDITSCORE_PROMPTS.read_text().replace("version: 1", "version: 4"))
    scorer = judge(vlm_folders["qwen2_vl"], prompts_path=str(prompts), score_range=10)
    assert scorer.version.endswith("editscore-prompts4")
    response = score_served_judge(serve, scorer)
    assert [r.details["prompt_version"] for r in response.results] == [4.0, 4.0]
    assert all(0 <= r.score <= 10 for r in response.results)


def test_an_overlong_instruction_fails_its_item_alone_at_once(vlm_folders, serve):
    """Issue 26 #6: one 64 KiB instruction took the tiny EditScore judge 154 s and 16 GB. The bytes
    are capped before tokenising (`max_instruction_bytes`), the tokens after
    (`max_instruction_tokens`); only that item fails, in one line, in under a second."""
    import resource
    import time

    from reward_servers.images import make_item

    scorer = judge(vlm_folders["qwen2_vl"], max_instruction_tokens=12)
    batch = judge_batch(3)
    st = serve(lambda: scorer, name="vlm_judge")
    instructions = ["add a hat " * 6554, "add a hat " * 5, "add a hat"]  # 64 KiB, 15 tokens, fine
    items = [
        make_item(str(i), batch.edited[i], batch.sources[i], text) for i, text in enumerate(instructions)
    ]
    with st.client() as client:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.monotonic()
        huge, many, fine = client.score(items).results
        took = time.monotonic() - start
    grew_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) / 1024
    print(f"64 KiB instruction: {took:.2f} s with a good item, peak RSS grew {grew_mib:.0f} MiB")
    assert huge.status == many.status == 2 and math.isnan(huge.score)
    assert huge.error == "instruction of 65540 bytes exceeds max_instruction_bytes 8192"
    assert many.error == "instruction of 15 tokens exceeds max_instruction_tokens 12"
    assert fine.status == 1 and math.isfinite(fine.score), fine.error
    assert took < 30 and grew_mib < 512
    start = time.monotonic()
    alone = scorer.score(ScoreBatch(batch.edited[:1], batch.sources[:1], instructions[:1]))
    assert time.monotonic() - start < 1.0 and alone.errors[0] == huge.error


def test_bad_editscore_prompt_files_fail_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    text = EDITSCORE_PROMPTS.read_text()
    for broken, field in (
        (text.replace("score_prefix:", "score_prefix_x:"), "score_prefix"),
        (text.replace("{score_range}", "N"), "score_range"),
        (text.replace("version: 1", "version: one"), "version"),
    ):
        bad.write_text(broken)
        with pytest.raises(UserError, match=field) as err:
            load_editscore_prompts(bad)
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="score_range"):
        DigitReader(DigitTokenizer(), 100)


@pytest.mark.weights
@pytest.mark.parametrize(
    ("base", "adapter"),
    [
        ("Qwen/Qwen3-VL-4B-Instruct", "EditScore/EditScore-Qwen3-VL-4B-Instruct"),
        ("Qwen/Qwen2.5-VL-7B-Instruct", "EditScore/EditScore-7B"),
    ],
)
def test_editscore_real_checkpoints(base, adapter):
    """EditScore's released LoRA adapters on their bases (--run-weights; a GPU helps)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    scorer = build_scorer(
        "vlm_judge", model_id=base, lora_path=adapter, mode="editscore", device=device, dtype="bfloat16"
    )
    result = scorer.score(judge_batch(2))
    assert np.isfinite(result.scores).all() and ((result.scores >= 0) & (result.scores <= 10)).all()
    assert all(d["label_mass"] > 0.5 for d in result.details)  # a trained judge writes a number there
    assert all(t["sc_reasoning"] for t in result.texts)
