"""The synthetic edit dataset: deterministic, disjoint splits, well-formed edits at any resolution."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from sampler.synthetic import ALL_KINDS, PALETTE, save_synthetic, synthetic_edits


def _digest(image: np.ndarray) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def test_deterministic_and_seed_dependent():
    a, b = synthetic_edits(3, 12, 32), synthetic_edits(3, 12, 32)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.source, y.source) and np.array_equal(x.target, y.target)
        assert np.array_equal(x.mask, y.mask) and x.instruction == y.instruction and x.metadata == y.metadata
    other = synthetic_edits(4, 12, 32)
    assert any(not np.array_equal(x.source, y.source) for x, y in zip(a, other, strict=True))


def test_train_and_heldout_are_disjoint():
    """No held-out source image (hence no (source, instruction) pair) occurs in the train split, for
    the same seed or another: the split is decided by a hash of the scene, not by the stream."""
    train = {seed: synthetic_edits(seed, 500, 32, "train") for seed in (0, 1)}
    heldout = {seed: synthetic_edits(seed, 120, 32, "heldout") for seed in (0, 1)}
    for a in (0, 1):
        train_sources = {_digest(s.source) for s in train[a]}
        pairs = {(_digest(s.source), s.instruction) for s in train[a]}
        for b in (0, 1):
            assert not train_sources & {_digest(s.source) for s in heldout[b]}, (a, b)
            assert not pairs & {(_digest(s.source), s.instruction) for s in heldout[b]}, (a, b)
    assert {s.metadata["split"] for s in heldout[0]} == {"heldout"}
    # The held-out split is not a trivial subset: it covers every kind and new scenes.
    assert {s.metadata["kind"] for s in heldout[0]} == set(ALL_KINDS)
    assert len({_digest(s.source) for s in heldout[0]}) > 100


def test_edits_are_well_formed():
    for s in synthetic_edits(0, 80, 32):
        meta, kind = s.metadata, s.metadata["kind"]
        assert s.source.shape == s.target.shape == (32, 32, 3) and s.mask.shape == (32, 32)
        assert s.source.dtype == s.target.dtype == np.uint8 and s.mask.dtype == bool
        json.dumps(meta)  # JSON-safe
        # Outside the mask nothing changes; inside, the region becomes the asked flat colour.
        assert np.array_equal(s.source[~s.mask], s.target[~s.mask])
        assert s.mask.sum() >= 40, "edit regions stay visible at 32 x 32"
        shapes = [x["shape"] for x in meta["scene"]]
        assert len(shapes) == len(set(shapes)) and 1 <= len(shapes) <= 3
        if kind == "brighten":
            assert s.mask.all() and s.target.astype(int).sum() > s.source.astype(int).sum()
            assert s.instruction in ("make it brighter", "brighten the image", "increase the brightness")
            continue
        rgb = meta["target_rgb"]
        assert (s.target[s.mask] == rgb).all() and tuple(rgb) == PALETTE[meta["target_colour"]]
        assert meta["target_colour"] != meta["colour"], "the target colour differs from the current one"
        assert not (s.source[s.mask] == rgb).all(axis=1).any()
        if kind == "remove":
            assert meta["target_colour"] == meta["background"]
            assert re.fullmatch(r"(remove|delete|take away) the (circle|square|triangle)", s.instruction)
        if kind in ("recolor", "remove"):
            assert meta["shape"] in s.instruction and meta["shape"] in shapes
        if kind in ("recolor", "background"):
            assert meta["target_colour"] in s.instruction


def test_kinds_cycle_and_any_resolution():
    small = synthetic_edits(5, 6, 32, kinds=("recolor", "remove"))
    assert [s.metadata["kind"] for s in small] == ["recolor", "remove"] * 3
    large = synthetic_edits(5, 6, 96, kinds=("recolor", "remove"))
    for a, b in zip(small, large, strict=True):  # same scenes and edits, finer pixels
        assert a.metadata == b.metadata and a.instruction == b.instruction
        assert abs(a.mask.mean() - b.mask.mean()) < 0.03
    with pytest.raises(ValueError, match="kinds"):
        synthetic_edits(0, 2, 32, kinds=("blur",))
    with pytest.raises(ValueError, match="split"):
        synthetic_edits(0, 2, 32, split="test")


def test_save_synthetic_round_trips_through_the_jsonl_loader(tmp_path):
    from trainer.config import DataConfig
    from trainer.data.inputs import load_inputs

    samples = synthetic_edits(0, 5, 32, "heldout")
    path = save_synthetic(tmp_path / "set", samples)
    inputs = load_inputs(DataConfig(source="jsonl", path=str(path)), 32)
    assert inputs.instructions == [s.instruction for s in samples]
    assert inputs.metadata == [s.metadata for s in samples]
    np.testing.assert_array_equal(inputs.masks.numpy(), np.stack([s.mask for s in samples]))
    as_uint8 = lambda t: (t * 255).round().byte().permute(0, 2, 3, 1).numpy()  # noqa: E731
    np.testing.assert_array_equal(as_uint8(inputs.sources), np.stack([s.source for s in samples]))
    np.testing.assert_array_equal(as_uint8(inputs.targets), np.stack([s.target for s in samples]))


def test_every_instruction_fits_the_tiny_tokenizer_untruncated():
    """The tiny model's byte-level tokenizer takes 32 tokens; a truncated instruction loses its colour."""
    from sampler.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    longest = max(
        (len(tok(s.instruction).input_ids), s.instruction)
        for s in synthetic_edits(0, 400, 32, kinds=ALL_KINDS)
    )
    assert longest[0] <= tok.model_max_length, longest
