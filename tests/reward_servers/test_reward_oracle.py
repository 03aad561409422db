"""The oracle scorers on synthetic edits: ground truth scores ~1, doing nothing or the wrong colour
scores low, missing ground truth fails alone, and masks and metadata travel through a real gRPC server."""

from __future__ import annotations

import math

import numpy as np
import pytest

from protos.spie.reward.v1 import reward_pb2 as pb
from reward_servers.base import ScoreBatch, build_scorer
from reward_servers.images import make_item
from sampler.synthetic import PALETTE, synthetic_edits

OK, INVALID = pb.Result.STATUS_OK, pb.Result.STATUS_INVALID_INPUT


@pytest.fixture(scope="module")
def samples():
    return synthetic_edits(0, 12, 32, "heldout")  # three of each kind


def batch_of(samples, edits, masks=True, metadata=True) -> ScoreBatch:
    n = len(samples)
    return ScoreBatch(
        edits,
        [s.source for s in samples],
        [s.instruction for s in samples],
        [s.mask for s in samples] if masks else None,
        None,
        [s.metadata for s in samples] if metadata else [{} for _ in range(n)],
    )


def wrong_colour(sample) -> np.ndarray:
    """The ground-truth edit with the region painted in a palette colour other than the asked one."""
    edit = sample.target.copy()
    if sample.metadata["kind"] == "brighten":
        return np.round(sample.source * 0.6).astype(np.uint8)  # darker instead of brighter
    other = next(c for c in PALETTE.values() if list(c) != sample.metadata["target_rgb"])
    edit[sample.mask] = other
    return edit


def test_ground_truth_source_and_wrong_colour(samples):
    oracle = build_scorer("oracle_edit")
    assert oracle.higher_is_better and oracle.model_id == ""
    truth = oracle.score(batch_of(samples, [s.target for s in samples]))
    source = oracle.score(batch_of(samples, [s.source for s in samples]))
    wrong = oracle.score(batch_of(samples, [wrong_colour(s) for s in samples]))
    for result in (truth, source, wrong):
        assert result.errors == [None] * len(samples)
    assert (truth.scores > 0.98).all() and [d["success"] for d in truth.details] == [1.0] * 12
    assert all(d["structure"] == pytest.approx(1.0, abs=1e-3) for d in truth.details)
    assert all(d["colour_error"] < 2 for d in truth.details)
    for result in (source, wrong):
        assert (result.scores < 0.2).all() and [d["success"] for d in result.details] == [0.0] * 12
    # Brighten reports the fitted blend amount: ~0.5 for the truth, 0 for the untouched source.
    for s, t, u in zip(samples, truth.details, source.details, strict=True):
        if s.metadata["kind"] == "brighten":
            assert t["gain"] == pytest.approx(0.5, abs=0.01) and u["gain"] == pytest.approx(0.0)


def test_partial_edit_is_between_and_structure_sees_only_the_outside(samples):
    oracle, structure = build_scorer("oracle_edit"), build_scorer("oracle_structure")
    s = next(x for x in samples if x.metadata["kind"] == "recolor")
    half = np.round(0.5 * s.source.astype(float) + 0.5 * s.target).astype(np.uint8)
    spoiled = s.target.copy()
    spoiled[~s.mask] = 255 - spoiled[~s.mask]  # right colour, but the rest of the picture is destroyed
    scores = oracle.score(batch_of([s] * 3, [s.source, half, s.target]))
    assert scores.scores[0] < scores.scores[1] < scores.scores[2]
    st = structure.score(batch_of([s] * 3, [s.target, spoiled, s.source], metadata=False))
    assert (
        st.errors == [None] * 3 and st.scores[0] == pytest.approx(1.0) and st.scores[2] == pytest.approx(1.0)
    )
    assert st.scores[1] < 0.5
    # Without a mask, oracle_structure compares the whole frame.
    whole = structure.score(batch_of([s], [s.target], masks=False, metadata=False))
    assert whole.errors == [None] and whole.scores[0] < 0.99


def test_missing_ground_truth_fails_alone(samples):
    oracle = build_scorer("oracle_edit")
    flat = next(x for x in samples if x.metadata["kind"] != "brighten")
    bright = next(x for x in samples if x.metadata["kind"] == "brighten")
    items = [flat, flat, flat, bright, flat]
    metadata = [flat.metadata, {}, {**flat.metadata, "target_rgb": "red"}, bright.metadata, flat.metadata]
    masks = [flat.mask, flat.mask, flat.mask, None, None]
    batch = ScoreBatch([x.target for x in items], [x.source for x in items], ["x"] * 5, masks, None, metadata)
    result = oracle.score(batch)
    assert result.errors[0] is None and result.errors[3] is None  # brighten needs no mask
    assert "metadata.kind" in result.errors[1] and "metadata.target_rgb" in result.errors[2]
    assert "needs its edit mask" in result.errors[4]
    assert all(math.isnan(result.scores[i]) for i in (1, 2, 4))
    assert all("\n" not in e for e in result.errors if e)


def test_oracle_over_grpc_with_masks_and_metadata(serve, samples):
    """Masks and metadata (nested lists, numbers as proto doubles) travel in the proto; the served
    scores equal the in-process ones; an item without metadata gets STATUS_INVALID_INPUT alone."""
    st = serve("oracle_edit")
    items = [
        make_item(f"t{i}", s.target, s.source, s.instruction, s.mask, metadata=s.metadata, encoding="png")
        for i, s in enumerate(samples[:4])
    ]
    items += [
        make_item(f"s{i}", s.source, s.source, s.instruction, s.mask, metadata=s.metadata)
        for i, s in enumerate(samples[:4])
    ]
    items.append(make_item("no_meta", samples[0].target, samples[0].source, "x", samples[0].mask))
    with st.client() as client:
        response = client.score(items)
    by_id = {r.id: r for r in response.results}
    assert response.scorer == "oracle_edit"
    expected = build_scorer("oracle_edit").score(batch_of(samples[:4], [s.target for s in samples[:4]]))
    for i in range(4):
        truth, untouched = by_id[f"t{i}"], by_id[f"s{i}"]
        assert truth.status == OK and untouched.status == OK
        assert truth.score == pytest.approx(expected.scores[i], abs=1e-9)
        assert truth.details["success"] == 1.0 and untouched.details["success"] == 0.0
        assert truth.details["structure"] == pytest.approx(1.0, abs=1e-3)
        assert untouched.score < 0.2 < 0.98 < truth.score
    assert by_id["no_meta"].status == INVALID and "metadata.kind" in by_id["no_meta"].error
