"""Model-backed scorers on tiny seeded models saved with save_pretrained and loaded back through the
same from_pretrained path: shapes, finiteness, batch invariance, preprocessing, per-item errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reward_servers import aesthetic, depth, exemplar, segmentation, vlm_judge
from reward_servers.base import ScoreBatch, build_scorer
from reward_servers.vision import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

# name -> (module with save_tiny, constructor kwargs besides model_id, needs equal sizes)
TINY = {
    "depth_structure": (depth, {"input_size": 56}, True),
    "segmentation_structure": (segmentation, {"input_size": 64}, True),
    "aesthetic": (aesthetic, {"mlp_path": "aesthetic_mlp.safetensors"}, False),
    "exemplar_semantic": (exemplar, {"input_size": 56, "rec_lambda": 0.5}, True),
    "vlm_judge": (vlm_judge, {"max_pixels": None}, False),
}


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # kind to the 2-core CI machine; restored after this module
    built = {}
    for name, (module, kwargs, _) in TINY.items():
        folder = str(tmp_path_factory.mktemp(name))
        module.save_tiny(folder)
        built[name] = build_scorer(name, model_id=folder, device="cpu", **kwargs)
    yield built
    torch.set_num_threads(threads)


def make_batch(rng, n: int, sizes=((40, 48), (32, 32), (48, 40), (36, 52))) -> ScoreBatch:
    edited, sources, masks, exemplars = [], [], [], []
    for k in range(n):
        h, w = sizes[k % len(sizes)]
        source = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        edit = source.copy()
        edit[h // 4 : h // 2, w // 4 : w // 2] = rng.integers(
            0, 256, size=(h // 2 - h // 4, w // 2 - w // 4, 3)
        )
        mask = np.zeros((h, w), bool)
        mask[h // 4 : h // 2, w // 4 : w // 2] = True
        edited.append(edit)
        sources.append(source)
        masks.append(mask if k % 2 == 0 else None)
        exemplars.append([rng.integers(0, 256, size=(30, 30, 3), dtype=np.uint8) for _ in range(1 + k % 2)])
    instructions = ["make it snowy", "add a red hat", "keep the sky blue", "add a hat"][:n]
    return ScoreBatch(edited, sources, (instructions * n)[:n], masks, exemplars, [{} for _ in range(n)])


def subset(batch: ScoreBatch, i: int) -> ScoreBatch:
    return ScoreBatch(
        [batch.edited[i]],
        [batch.sources[i]],
        [batch.instructions[i]],
        [batch.mask(i)],
        [batch.exemplar_list(i)],
    )


@pytest.mark.parametrize("name", sorted(TINY))
def test_shapes_finite_and_batch_invariant(scorers, name, rng):
    scorer = scorers[name]
    batch = make_batch(rng, 4)
    result = scorer.score(batch)
    assert result.scores.shape == (4,) and np.isfinite(result.scores).all(), result.errors
    assert result.errors == [None] * 4 and len(result.details) == 4
    for i in range(4):
        alone = scorer.score(subset(batch, i))
        np.testing.assert_allclose(
            alone.scores[0], result.scores[i], rtol=0, atol=1e-5, err_msg=f"{name} item {i}"
        )


@pytest.mark.parametrize("name", ["depth_structure", "segmentation_structure", "exemplar_semantic"])
def test_mismatched_sizes_fail_per_item(scorers, name, rng):
    batch = make_batch(rng, 3)
    batch.sources[1] = batch.sources[1][:-4]
    result = scorers[name].score(batch)
    assert "sizes differ" in result.errors[1] and np.isnan(result.scores[1])
    assert result.errors[0] is None and result.errors[2] is None and np.isfinite(result.scores[[0, 2]]).all()


def test_structure_of_an_identical_copy(scorers, rng):
    batch = make_batch(rng, 2)
    same = ScoreBatch(batch.sources, batch.sources, batch.instructions)
    assert scorers["depth_structure"].score(same).scores == pytest.approx([0.0, 0.0], abs=1e-9)
    assert scorers["segmentation_structure"].score(same).scores == pytest.approx([1.0, 1.0])
    edited = scorers["depth_structure"].score(ScoreBatch(batch.edited, batch.sources, batch.instructions))
    assert (edited.scores < 0).all()


def test_exemplar_score_and_reconstruction_term(scorers, rng):
    scorer = scorers["exemplar_semantic"]
    batch = make_batch(rng, 2)
    # An exemplar identical to the edit matches every patch exactly: semantic = 1.
    own = ScoreBatch(batch.edited, batch.sources, batch.instructions, exemplars=[[e] for e in batch.edited])
    result = scorer.score(own)
    assert [d["semantic"] for d in result.details] == pytest.approx([1.0, 1.0], abs=1e-5)
    mse = [
        float(((e / 255.0 - s / 255.0) ** 2).mean()) for e, s in zip(batch.edited, batch.sources, strict=True)
    ]
    assert result.scores == pytest.approx(1.0 - 0.5 * np.array(mse), abs=1e-5)
    missing = scorer.score(
        ScoreBatch(batch.edited, batch.sources, batch.instructions, exemplars=[[], [batch.edited[1]]])
    )
    assert "exemplar" in missing.errors[0] and missing.errors[1] is None


@pytest.mark.parametrize("name", ["depth_structure", "segmentation_structure", "exemplar_semantic"])
def test_imagenet_preprocessing(scorers, name):
    scorer = scorers[name]
    image = np.full((30, 70, 3), (10, 128, 250), np.uint8)
    pixels = scorer.preprocess([image, image])
    size = scorer.input_size
    assert pixels.shape == (2, 3, size, size) and pixels.dtype == torch.float32
    expected = (np.array([10, 128, 250]) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(pixels.mean(dim=(0, 2, 3)).numpy(), expected, atol=1e-5)


def test_clip_preprocessing_crops_the_centre(scorers):
    scorer = scorers["aesthetic"]
    image = np.zeros((32, 96, 3), np.uint8)
    image[:, 32:64] = 255  # white centre third, black sides
    pixels = scorer.preprocess([image])
    assert pixels.shape == (1, 3, 32, 32)
    white = (1.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(pixels[0, :, 4:28, 4:28].mean(dim=(1, 2)).numpy(), white, atol=1e-3)


def test_aesthetic_mlp_loads_from_pth(scorers, tmp_path):
    """The LAION .pth layout (keys `layers.N.*`) loads with weights_only and gives the same scores."""
    scorer = scorers["aesthetic"]
    state = {f"layers.{k}": v for k, v in scorer.mlp.state_dict().items()}
    torch.save(state, tmp_path / "mlp.pth")
    again = build_scorer("aesthetic", model_id=scorer.model_id, mlp_path=str(tmp_path / "mlp.pth"))
    batch = make_batch(np.random.default_rng(3), 2)
    np.testing.assert_allclose(again.score(batch).scores, scorer.score(batch).scores, atol=1e-7)
    with pytest.raises(FileNotFoundError, match="mlp_path"):
        build_scorer("aesthetic", model_id=scorer.model_id, mlp_path=str(tmp_path / "none.pth"))


def test_vlm_reads_yes_from_the_last_position(scorers, rng):
    scorer = scorers["vlm_judge"]
    batch = make_batch(rng, 2)
    inputs = scorer.build_inputs(batch.sources, batch.edited, batch.instructions)
    assert inputs["attention_mask"][:, -1].all()  # left padding: the answer slot is last for every item
    n_image_tokens = (inputs["input_ids"] == scorer.model.config.image_token_id).sum().item()
    assert n_image_tokens * 4 == inputs["pixel_values"].shape[0]  # merge 2x2 patches per token
    result = scorer.score(batch)
    with torch.inference_mode():
        logits = scorer.model(**inputs).logits[:, -1].float()
    p_yes = torch.softmax(logits, -1)[:, scorer.yes_id].numpy()
    np.testing.assert_allclose(result.scores, p_yes, atol=1e-6)
    assert all(0 < d["p_yes"] < 1 and 0 < d["p_no"] < 1 for d in result.details)


def test_model_scorer_served_over_grpc(scorers, serve, rng):
    from reward_servers.images import make_item

    scorer = scorers["depth_structure"]
    st = serve(lambda: scorer, name="depth_structure")
    batch = make_batch(rng, 3)
    items = [
        make_item(str(i), batch.edited[i], batch.sources[i], mask=batch.mask(i), encoding="png")
        for i in range(3)
    ]
    with st.client() as client:
        response = client.score(items)
    np.testing.assert_allclose([r.score for r in response.results], scorer.score(batch).scores, atol=1e-5)


def test_hpsv2_needs_open_clip_and_a_checkpoint(tmp_path):
    pytest.importorskip("open_clip")
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        build_scorer("hpsv2", checkpoint=str(tmp_path / "missing.pt"))


@pytest.mark.weights
@pytest.mark.parametrize(
    "name", ["depth_structure", "segmentation_structure", "exemplar_semantic", "vlm_judge"]
)
def test_real_checkpoints(name, rng):
    """With hub access: the default checkpoints load and score finitely."""
    scorer = build_scorer(name)
    batch = make_batch(rng, 2)
    result = scorer.score(batch)
    assert np.isfinite(result.scores).all(), result.errors
