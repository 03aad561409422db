"""The registered `clip` scorer on a tiny seeded CLIP: InstructPix2Pix's own similarity formulas on
the same embeddings, captions from the metadata, batch invariance, and serving over gRPC."""

from __future__ import annotations

import numpy as np
import pytest
import torch.nn.functional as F

from reward_servers.base import ScoreBatch, available_scorers, build_scorer
from reward_servers.clip_score import save_tiny


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = save_tiny(str(tmp_path_factory.mktemp("clip")))
    return build_scorer("clip", model_id=folder)


def _batch(seed: int = 0, n: int = 3) -> ScoreBatch:
    rng = np.random.default_rng(seed)
    sources = [rng.integers(0, 256, (40, 48 + 8 * k, 3), dtype=np.uint8) for k in range(n)]
    edits = [np.ascontiguousarray(255 - s) if k % 2 else s.copy() for k, s in enumerate(sources)]
    edits[0][:10] = 0
    meta = [{"source_caption": "a cat", "target_caption": "a dog"}, {}, {"target_caption": "snow"}][:n]
    return ScoreBatch(edits, sources, ["make it a dog", "invert it", "add snow"][:n], metadata=meta)


def test_clip_is_registered_and_matches_instruct_pix2pix(clip):
    assert "clip" in available_scorers()
    batch = _batch()
    result = clip.score(batch)
    e, s = clip.embed_images(list(batch.edited)), clip.embed_images(list(batch.sources))
    # timothybrooks/instruct-pix2pix, metrics/clip_similarity.py, `ClipSimilarity.forward` (image_0 the
    # source, image_1 the edit, text_0 / text_1 the source / target captions):
    #     sim_1 = F.cosine_similarity(image_features_1, text_features_1)
    #     sim_direction = F.cosine_similarity(image_features_1 - image_features_0,
    #                                         text_features_1 - text_features_0)
    #     sim_image = F.cosine_similarity(image_features_0, image_features_1)
    t0, t1 = clip.embed_texts(["a cat"]), clip.embed_texts(["a dog"])
    sim_1 = F.cosine_similarity(e[:1], t1)
    sim_direction = F.cosine_similarity(e[:1] - s[:1], t1 - t0)
    sim_image = F.cosine_similarity(s, e)
    d = result.details
    assert d[0]["clip_text_image"] == pytest.approx(float(sim_1), abs=1e-6)
    assert d[0]["clip_direction"] == pytest.approx(float(sim_direction), abs=1e-6)
    np.testing.assert_allclose([x["clip_image"] for x in d], sim_image.double().numpy(), atol=1e-6)
    # Without both captions the text direction is the instruction's embedding; the target caption
    # alone still sets the text-image target.
    t_instr = clip.embed_texts(["invert it"])
    assert d[1]["clip_direction"] == pytest.approx(
        float(F.cosine_similarity(e[1:2] - s[1:2], t_instr)), abs=1e-6
    )
    assert d[2]["clip_text_image"] == pytest.approx(
        float(F.cosine_similarity(e[2:], clip.embed_texts(["snow"]))), abs=1e-6
    )
    assert d[2]["clip_direction"] == pytest.approx(0.0, abs=1e-6)  # an unchanged edit has no direction
    np.testing.assert_array_equal(result.scores, [x["clip_direction"] for x in d])


def test_clip_batch_invariance_and_score_choice(clip):
    batch = _batch(seed=1)
    result = clip.score(batch)
    for i in range(3):
        one = ScoreBatch(
            [batch.edited[i]], [batch.sources[i]], [batch.instructions[i]], metadata=[batch.meta(i)]
        )
        np.testing.assert_allclose(clip.score(one).scores[0], result.scores[i], atol=1e-5, rtol=0)
    other = build_scorer("clip", model_id=clip.model_id, score="clip_image")
    np.testing.assert_allclose(
        other.score(batch).scores, [d["clip_image"] for d in result.details], atol=1e-6
    )
    with pytest.raises(ValueError, match="score must be one of"):
        build_scorer("clip", model_id=clip.model_id, score="clip_magic")


def test_clip_served_over_grpc(clip, serve):
    from reward_servers.images import make_item

    batch = _batch(seed=2, n=2)
    st = serve(lambda: clip, name="clip")
    with st.client() as client:
        items = [
            make_item(str(i), batch.edited[i], batch.sources[i], batch.instructions[i]) for i in range(2)
        ]
        items[0].metadata.update(batch.meta(0))
        response = client.score(items)
    expected = clip.score(batch).scores
    np.testing.assert_allclose([r.score for r in response.results], expected, atol=1e-5)
