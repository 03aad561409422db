"""Every model-backed scorer loads its real checkpoint (marked `weights`: skipped unless --run-weights,
which needs hub access or the checkpoints in the hub cache; a GPU helps the VLMs).

Already elsewhere: depth_structure, segmentation_structure, exemplar_semantic and vlm_judge yes_no
(`test_reward_scorers.py::test_real_checkpoints`), hpsv2 (`test_reward_gradients.py`), the editscore
mode's LoRA checkpoints (`test_reward_editscore.py`). Here: clip, grounding, aesthetic, vlm_judge's
rating and viescore modes and its Qwen2.5-VL / Qwen3-VL families, edit_reward's backbone.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from reward_servers.base import ScoreBatch, build_scorer

pytestmark = pytest.mark.weights
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def photo_batch(n: int = 2, size: int = 224) -> ScoreBatch:
    """A red square on grey (source) and the same square turned blue (edit), n times."""
    source = np.full((size, size, 3), 128, np.uint8)
    source[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = (200, 30, 30)
    edit = source.copy()
    edit[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = (30, 30, 200)
    return ScoreBatch(
        [edit] * n, [source] * n, ["make the square blue"] * n, metadata=[{"phrase": "square"}] * n
    )


def test_clip_loads_its_hub_checkpoint():
    result = build_scorer("clip", device=DEVICE).score(photo_batch())
    assert np.isfinite(result.scores).all(), result.errors
    assert {"clip_text_image", "clip_image"} <= set(result.details[0])


def test_grounding_loads_grounding_dino_and_sam():
    scorer = build_scorer("grounding", device=DEVICE)
    (found,) = scorer.ground([photo_batch(1).edited[0]], ["square"])
    assert found.error is None and 0 < found.score <= 1
    assert found.mask.shape == (224, 224) and found.mask[112, 112]


def test_aesthetic_loads_clip_and_the_laion_mlp():
    """Needs the LAION MLP (`sac+logos+ava1-l14-linearMSE.pth`) in the working folder or at
    $SPIE_AESTHETIC_MLP."""
    mlp = os.environ.get("SPIE_AESTHETIC_MLP", "sac+logos+ava1-l14-linearMSE.pth")
    if not Path(mlp).is_file():
        pytest.skip(f"no LAION aesthetic MLP at {mlp}")
    result = build_scorer("aesthetic", mlp_path=mlp, device=DEVICE).score(photo_batch())
    assert np.isfinite(result.scores).all() and (result.scores > 0).all() and (result.scores < 11).all()


@pytest.mark.parametrize(
    ("model_id", "mode"),
    [
        ("Qwen/Qwen2-VL-2B-Instruct", "rating"),
        ("Qwen/Qwen2.5-VL-3B-Instruct", "viescore"),
        ("Qwen/Qwen3-VL-2B-Instruct", "rating"),
    ],
)
def test_vlm_judge_modes_on_real_checkpoints(model_id, mode):
    scorer = build_scorer("vlm_judge", model_id=model_id, mode=mode, device=DEVICE, dtype="bfloat16")
    result = scorer.score(photo_batch())
    assert np.isfinite(result.scores).all(), result.errors
    if mode == "rating":  # an instruction-tuned judge answers with a number at the slot
        assert all(d["label_mass"] > 0.5 for d in result.details)


def test_edit_reward_backbone_with_trained_heads():
    """Needs trained heads (safetensors, keys `<head>.<i>.weight|bias`) at $SPIE_EDIT_REWARD_HEADS."""
    heads = os.environ.get("SPIE_EDIT_REWARD_HEADS", "")
    if not heads or not Path(heads).is_file():
        pytest.skip("set SPIE_EDIT_REWARD_HEADS to a reward-head file")
    scorer = build_scorer("edit_reward", head_path=heads, device=DEVICE)
    result = scorer.score(photo_batch())
    assert np.isfinite(result.scores).all(), result.errors
