"""The grounding service (GroundingDINO box + SAM mask) on tiny seeded models, over the real `Ground`
RPC: with the two models' outputs controlled on a constructed image, the mask is exactly the object's
box region (the box and mask coordinate chain through both processors); a phrase found nowhere, a
bad item and a server that cannot ground fail as documented."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import torch

from reward_servers.base import ScoreBatch, build_scorer
from reward_servers.grounding import box_mask, save_tiny
from reward_servers.grounding_rpc import make_ground_item, result_mask

SQUARE = (20, 10, 40, 20)  # x0, y0, x1, y1 of the object in the 60 x 40 test image


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("grounding")))


def scene() -> np.ndarray:
    image = np.full((40, 60, 3), 30, np.uint8)
    x0, y0, x1, y1 = SQUARE
    image[y0:y1, x0:x1] = (220, 40, 40)
    return image


def control(scorer) -> None:
    """Forward hooks fix the two models' outputs: the detector puts every query on the square, with
    query 0 confident on images that have it (none on blank ones); SAM returns, for the box it is given
    (in its own resized frame), low-res logits that are the signed distance to the box's border."""
    w, h = 60, 40
    x0, y0, x1, y1 = SQUARE
    box = torch.tensor([(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h])

    def detector_hook(module, args, kwargs, out):
        pixels = kwargs["pixel_values"]
        out.pred_boxes = box.expand_as(out.pred_boxes).clone()
        logits = torch.full_like(out.logits, -8.0)
        has_object = pixels.std(dim=(2, 3)).amax(dim=1) > 0.1  # blank images: nothing to find
        logits[has_object, 0] = 8.0
        out.logits = logits
        return out

    def sam_hook(module, args, kwargs, out):
        boxes = kwargs["input_boxes"]  # (N, 1, 4) in SAM's resized frame
        side = out.pred_masks.shape[-1]  # low-res side; the padded input is 4x larger
        centres = (torch.arange(side, dtype=torch.float32) + 0.5) * 4
        bx0, by0, bx1, by1 = (boxes[:, 0, k, None] for k in range(4))
        dx = torch.minimum(centres[None] - bx0, bx1 - centres[None])  # (N, side)
        dy = torch.minimum(centres[None] - by0, by1 - centres[None])
        signed = torch.minimum(dy[:, :, None], dx[:, None, :])  # (N, side, side)
        out.pred_masks = signed[:, None, None].expand_as(out.pred_masks).clone()
        return out

    scorer.detector.register_forward_hook(detector_hook, with_kwargs=True)
    scorer.sam.register_forward_hook(sam_hook, with_kwargs=True)


def test_mask_is_the_box_region_over_grpc(tiny, serve):
    dino, sam = tiny
    scorer = build_scorer("grounding", model_id=dino, sam_id=sam)
    control(scorer)
    st = serve(lambda: scorer, name="grounding")
    blank = np.full((40, 60, 3), 30, np.uint8)
    items = [
        make_ground_item("obj", scene(), "the red square"),
        make_ground_item("png", scene(), "the red square", encoding="png"),
        make_ground_item("none", blank, "the red square"),
        make_ground_item("empty", scene(), "  "),
    ]
    with st.client() as client:
        response = client.ground(items)
    assert response.grounder == "grounding" and response.version == scorer.version
    ok, png, none, empty = response.results
    expected = box_mask((40, 60), SQUARE)
    for result in (ok, png):
        assert result.status == 1, result.error
        np.testing.assert_allclose(list(result.box), SQUARE, atol=1e-3)
        assert result.box_score == pytest.approx(1 / (1 + np.exp(-8.0)), abs=1e-6)
        mask = result_mask(result)
        assert mask.shape == (40, 60) and mask.sum() == expected.sum() == 200
        np.testing.assert_array_equal(mask, expected)
    assert none.status == 2 and "not found" in none.error and not none.mask.data
    assert empty.status == 2 and "phrase: empty" in empty.error


def test_uncontrolled_tiny_models_and_box_masks(tiny):
    dino, sam = tiny
    with_sam = build_scorer("grounding", model_id=dino, sam_id=sam, box_threshold=0.0)
    boxes_only = build_scorer("grounding", model_id=dino, sam_id="", box_threshold=0.0)
    images = [scene(), np.random.default_rng(0).integers(0, 256, (50, 32, 3), dtype=np.uint8)]
    phrases = ["the red square", "a dog"]
    a, b = with_sam.ground(images, phrases), boxes_only.ground(images, phrases)
    for image, g, g_box in zip(images, a, b, strict=True):
        assert g.mask.shape == image.shape[:2] and g.mask.dtype == bool
        assert g.box == pytest.approx(g_box.box) and 0 <= g.score <= 1
        np.testing.assert_array_equal(g_box.mask, box_mask(image.shape[:2], g_box.box))
    again = with_sam.ground(images, phrases)
    np.testing.assert_array_equal(again[1].mask, a[1].mask)  # deterministic
    result = with_sam.score(ScoreBatch(images, images, phrases, metadata=[{"phrase": "a cat"}, {}]))
    assert np.isfinite(result.scores).all() and set(result.details[0]) == {
        "box_score",
        "x0",
        "y0",
        "x1",
        "y1",
    }


def test_ground_on_a_scorer_that_cannot_ground(serve, rng):
    st = serve("ssim_structure")
    with st.client() as client, pytest.raises(grpc.RpcError) as err:
        client.ground([make_ground_item("a", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "x")])
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "grounding" in err.value.details()


def test_items_the_models_cannot_take_fail_alone(tiny, serve):
    """Issue 26 #2: an image whose short side resizes to 0 px (1 x 2048, 2048 x 1), a phrase longer
    than the text encoder's 16 tokens, and a 1 MiB phrase each failed the whole request (UNKNOWN),
    taking the good item beside them down; now each fails alone, in one line."""
    dino, sam = tiny
    scorer = build_scorer("grounding", model_id=dino, sam_id=sam)
    control(scorer)
    st = serve(lambda: scorer, name="grounding")
    items = [
        make_ground_item("wide", np.full((1, 2048, 3), 30, np.uint8), "the red square"),
        make_ground_item("tall", np.full((2048, 1, 3), 30, np.uint8), "the red square"),
        make_ground_item("words", scene(), " ".join(["the red square"] * 67)),  # 200 words
        make_ground_item("mib", scene(), "a" * 2**20),
        make_ground_item("good", scene(), "the red square"),
        # 3 rows: an (H, W, 3) array with H = 3 once read as channels-first in SAM's processor
        make_ground_item("thin", np.random.default_rng(0).integers(0, 256, (3, 60, 3), np.uint8), "a dog"),
    ]
    with st.client() as client:
        start = time.monotonic()
        results = {r.id: r for r in client.ground(items).results}
    assert time.monotonic() - start < 10
    assert results["good"].status == 1, results["good"].error
    np.testing.assert_array_equal(result_mask(results["good"]), box_mask((40, 60), SQUARE))
    assert results["thin"].status == 1 and result_mask(results["thin"]).shape == (3, 60)
    expected = {
        "wide": "resizes to 0 px",
        "tall": "resizes to 0 px",
        "words": "max_text_len",
        "mib": "max_phrase_bytes",
    }
    for name, fragment in expected.items():
        assert results[name].status == 2 and fragment in results[name].error, results[name].error
        assert "\n" not in results[name].error and len(results[name].error) < 200
    # The score path (phrase from the instruction) checks the same way.
    batch = ScoreBatch([scene(), scene()], [scene(), scene()], ["a" * 2**20, "the red square"])
    result = scorer.score(batch)
    assert "max_phrase_bytes" in result.errors[0] and result.errors[1] is None
