"""Differentiable scorer forms and reward gradients on the gRPC wire (a real server on loopback)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reward_helpers import ServerThread

from protos.spie.reward.v1 import reward_pb2 as pb
from reward_servers.base import ScoreBatch, build_scorer
from reward_servers.batcher import BatcherConfig
from reward_servers.config import ServerConfig
from reward_servers.gradients import TensorError, decode_tensor, encode_tensor
from reward_servers.images import make_item


def _batch(n: int = 3, size: int = 16, seed: int = 0):
    """(float edits (n, 3, S, S) in [0, 1], ScoreBatch with sources, masks and recolor metadata)."""
    rng = np.random.default_rng(seed)
    edits = rng.uniform(0.1, 0.9, size=(n, 3, size, size))
    sources = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), bool)
    masks[:, 4:11, 3:12] = True
    uint8 = [np.round(e.transpose(1, 2, 0) * 255).astype(np.uint8) for e in edits]
    meta = [{"kind": "recolor", "target_rgb": [200, 40, 90]} for _ in range(n)]
    return edits, ScoreBatch(uint8, list(sources), ["recolor it"] * n, list(masks), metadata=meta)


@pytest.mark.parametrize("name", ["ssim_structure", "oracle_edit", "oracle_structure"])
def test_differentiable_form_matches_finite_differences(name):
    """Central differences (float64, step 1e-6) of the differentiable score along 4 random
    directions equal its autograd directional derivative to 1e-6 relative."""
    edits, batch = _batch()
    scorer = build_scorer(name, **({"rec_lambda": 0.5} if name == "ssim_structure" else {}))
    x = torch.tensor(edits, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(scorer.score_differentiable(x, batch).sum(), x)
    assert grad.abs().sum() > 0
    rng = np.random.default_rng(1)
    for _ in range(4):
        v = torch.tensor(rng.standard_normal(edits.shape))
        h = 1e-6
        with torch.no_grad():
            up = scorer.score_differentiable(x + h * v, batch).sum()
            down = scorer.score_differentiable(x - h * v, batch).sum()
        numeric, analytic = float((up - down) / (2 * h)), float((grad * v).sum())
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (numeric, analytic)


def test_differentiable_forms_agree_with_the_scores():
    """Brightness and both SSIMs: the differentiable form at the uint8 edit / 255 is the score itself;
    the oracle's smooth form is exp(-sqrt(e^2 + 1) / scale) of the score's colour error e."""
    edits, batch = _batch()
    x = torch.tensor(np.stack([e.transpose(2, 0, 1) for e in batch.edited]) / 255.0)
    for name in ("brightness", "ssim_structure", "oracle_structure"):
        scorer = build_scorer(name)
        np.testing.assert_allclose(
            scorer.score_differentiable(x, batch).numpy(), scorer.score(batch).scores, atol=1e-9
        )
    oracle = build_scorer("oracle_edit")
    error = np.array([d["colour_error"] for d in oracle.score(batch).details])
    np.testing.assert_allclose(
        oracle.score_differentiable(x, batch).numpy(), np.exp(-np.sqrt(error**2 + 1) / 50.0), rtol=1e-9
    )


def test_tensor_codec_round_trips_and_names_bad_fields():
    a = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float32)
    assert np.array_equal(decode_tensor(encode_tensor(a), "x"), a)
    assert np.allclose(decode_tensor(encode_tensor(a, "float16"), "x"), a, atol=1e-2)
    bad = encode_tensor(a)
    bad.data = bad.data[:-4]
    with pytest.raises(
        TensorError, match=r"item 0.gradient: 236 bytes do not hold float32 values of shape \[3, 4, 5\]"
    ):
        decode_tensor(bad, "item 0.gradient")
    with pytest.raises(TensorError, match="dtype"):
        decode_tensor(pb.Tensor(shape=[1], dtype="pickle", data=b"1234"), "t")


def _server(name: str) -> ServerThread:
    return ServerThread(
        lambda: build_scorer(name), name, ServerConfig(port=0), BatcherConfig(8, 5.0, 64), load=True
    )


def test_served_gradient_equals_the_in_process_gradient():
    """ssim_structure over gRPC: score and d score / d edit equal the in-process autograd ones to
    1e-5; an old client (no want_gradient) gets no gradient and the plain uint8 score."""
    edits, batch = _batch(4)
    edits = edits.astype(np.float32)
    scorer = build_scorer("ssim_structure")
    x = torch.tensor(edits, requires_grad=True)
    values = scorer.score_differentiable(x, batch)
    (grad,) = torch.autograd.grad(values.sum(), x)
    values = values.detach()
    server = _server("ssim_structure")
    try:
        with server.client() as client:
            items = [
                make_item(f"i{i}", batch.edited[i], batch.sources[i], "x", batch.masks[i], tensor=edits[i], want_gradient=True)
                for i in range(4)
            ]  # fmt: skip
            response = client.score(items, scorer="ssim_structure")
            for i, r in enumerate(response.results):
                assert r.status == pb.Result.STATUS_OK, r.error
                assert abs(r.score - float(values[i])) < 1e-5
                np.testing.assert_allclose(decode_tensor(r.gradient, "g"), grad[i].numpy(), atol=1e-5, rtol=0)
            old = [
                make_item(f"i{i}", batch.edited[i], batch.sources[i], "x", batch.masks[i]) for i in range(4)
            ]
            fields = {f: getattr(old[0], f) for f in ("id", "edited", "source", "instruction", "mask")}
            assert old[0].SerializeToString() == pb.Item(**fields).SerializeToString()  # the old bytes
            plain = client.score(old).results
            assert not any(r.HasField("gradient") for r in plain)
            np.testing.assert_allclose([r.score for r in plain], scorer.score(batch).scores, atol=1e-12)
    finally:
        server.close()


def test_a_non_differentiable_scorer_fails_gradient_items_naming_itself():
    edits, batch = _batch(2)
    server = _server("jpeg_compressibility")
    try:
        with server.client() as client:
            items = [make_item("a", batch.edited[0], batch.sources[0], want_gradient=True),
                     make_item("b", batch.edited[1], batch.sources[1])]  # fmt: skip
            a, b = client.score(items).results
        assert a.status == pb.Result.STATUS_INVALID_INPUT and not a.HasField("gradient")
        assert "scorer 'jpeg_compressibility' has no differentiable form" in a.error
        assert b.status == pb.Result.STATUS_OK  # the plain item of the same batch is scored as always
    finally:
        server.close()


def test_a_mis_shaped_edit_tensor_fails_its_item_alone():
    edits, batch = _batch(2)
    server = _server("brightness")
    try:
        with server.client() as client:
            bad = make_item(
                "bad", batch.edited[0], batch.sources[0], tensor=edits[0][:, :8], want_gradient=True
            )
            good = make_item("good", batch.edited[1], batch.sources[1], tensor=edits[1], want_gradient=True)
            r_bad, r_good = client.score([bad, good]).results
        assert (
            r_bad.status == pb.Result.STATUS_INVALID_INPUT
            and "edited_tensor: shape [3, 8, 16]" in r_bad.error
        )
        assert r_good.status == pb.Result.STATUS_OK
        np.testing.assert_allclose(
            decode_tensor(r_good.gradient, "g"), np.full((3, 16, 16), 1 / 768), rtol=1e-6
        )
    finally:
        server.close()


def test_an_edit_tensor_outside_the_image_range_fails_its_item_alone():
    """Issue 26 #5: values of 5.0 (or NaN) are no image; the item fails in one line, the rest score."""
    edits, batch = _batch(3)
    server = _server("brightness")
    try:
        with server.client() as client:
            items = [
                make_item(str(i), batch.edited[i], batch.sources[i], tensor=t, want_gradient=True)
                for i, t in enumerate([np.full_like(edits[0], 5.0), edits[1], np.full_like(edits[2], np.nan)])
            ]
            bright, good, nan = client.score(items).results
        for bad in (bright, nan):
            assert bad.status == pb.Result.STATUS_INVALID_INPUT and not bad.HasField("gradient")
            assert "outside the image range [0, 1]" in bad.error and "\n" not in bad.error, bad.error
        assert "[5, 5]" in bright.error
        assert good.status == pb.Result.STATUS_OK and good.HasField("gradient")
    finally:
        server.close()


def test_aesthetic_differentiable_form_follows_its_score(tmp_path):
    """The tiny seeded aesthetic model: the differentiable form (torch resize) is within 0.05 of the
    uint8 score (PIL resize) and has a gradient; the edits here are 48 px, resized to the tower's 32."""
    from reward_servers.aesthetic import save_tiny

    folder = save_tiny(str(tmp_path / "aesthetic"))
    scorer = build_scorer("aesthetic", model_id=folder, mlp_path="aesthetic_mlp.safetensors")
    edits, batch = _batch(3, size=48)
    x = torch.tensor(np.stack([e.transpose(2, 0, 1) for e in batch.edited]) / 255.0, dtype=torch.float32)
    x.requires_grad_(True)
    values = scorer.score_differentiable(x, batch)
    (grad,) = torch.autograd.grad(values.sum(), x)
    np.testing.assert_allclose(values.detach().numpy(), scorer.score(batch).scores, atol=0.05)
    assert grad.abs().sum() > 0


@pytest.mark.weights
def test_hpsv2_differentiable_form_follows_its_score():
    """Needs the `hps` extra and HPS_v2_compressed.pt in the working folder (--run-weights)."""
    scorer = build_scorer("hpsv2")
    edits, batch = _batch(2, size=224)
    x = torch.tensor(np.stack([e.transpose(2, 0, 1) for e in batch.edited]) / 255.0, dtype=torch.float32)
    x.requires_grad_(True)
    values = scorer.score_differentiable(x, batch)
    (grad,) = torch.autograd.grad(values.sum(), x)
    np.testing.assert_allclose(values.detach().numpy(), scorer.score(batch).scores, atol=0.5)
    assert grad.abs().sum() > 0
