"""Qwen-Image-Edit's condition image resized as diffusers' `QwenImageEditPipeline` resizes it, on a
non-square source that is not at the condition size (as in practice: 512 px sources, 1024 px
condition).

Upstream: diffusers v0.42 `pipelines/qwenimage/pipeline_qwenimage_edit.py`, `__call__` (line 662:
`image = self.image_processor.resize(image, calculated_height, calculated_width)` on the PIL input,
a `VaeImageProcessor` whose `resize` uses PIL with its `resample` config, "lanczos").
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sampler.editors.qwen_edit import QwenEditPolicy, condition_size, load_qwen_edit
from sampler.editors.tiny_qwen_edit import save_tiny_qwen_edit

H, W, AREA = 32, 64, 64 * 64  # a 32 x 64 source; its condition image is 32 x 96


@pytest.fixture(scope="module")
def qwen_pipe(tmp_path_factory):
    return load_qwen_edit(
        str(save_tiny_qwen_edit(tmp_path_factory.mktemp("qwen-edit"), seed=0, vae_warmup_steps=0))
    )


def _sources(m: int = 2) -> torch.Tensor:
    """8-bit sources, as the pipeline's PIL inputs are."""
    return (torch.randint(0, 256, (m, 3, H, W), generator=torch.Generator().manual_seed(3)) / 255).float()


def test_condition_image_is_the_pipelines_lanczos_resize(qwen_pipe):
    """Our condition image = the pipeline's image processor's resize of the PIL source, exactly (the
    torch bicubic-antialias resize we had differs by several 8-bit levels)."""
    assert condition_size(AREA, H, W) == (32, 96)
    policy = QwenEditPolicy(qwen_pipe, condition_area=AREA, max_text_length=48, resolution=H)
    sources = _sources()
    ours = policy.condition_images(sources)
    pil = [Image.fromarray((s.permute(1, 2, 0) * 255).round().byte().numpy()) for s in sources]
    theirs = [np.asarray(qwen_pipe.image_processor.resize(p, 32, 96)) for p in pil]
    assert qwen_pipe.image_processor.config.resample == "lanczos"
    theirs = torch.from_numpy(np.stack(theirs)).permute(0, 3, 1, 2).float() / 255
    assert ours.shape == (2, 3, 32, 96)
    assert torch.equal(ours, theirs)
    bicubic = torch.nn.functional.interpolate(sources, size=(32, 96), mode="bicubic", antialias=True).clamp(
        0, 1
    )
    assert (bicubic - theirs).abs().max() > 2 / 255


def test_edit_of_a_non_square_source_equals_the_pipeline(qwen_pipe, monkeypatch):
    """At noise level 0 (the ODE), a 32 x 64 source conditioned at 32 x 96: our edit = the pipeline's
    (measured 0.0; bound 1e-4), the pipeline seeing the same condition area (its 1024 * 1024 patched
    to 64 * 64). One PIL image, as the pipeline is called: given a list, its `image_processor.resize`
    returns the list unresized (line 662), so Qwen2.5-VL would read the sources at their own size
    while the VAE reads them resized (0.002 apart here)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as module

    original = module.calculate_dimensions
    monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio: original(AREA, ratio))
    sources = _sources(1)
    policy = QwenEditPolicy(
        qwen_pipe, num_steps=3, noise_level=0.0, true_cfg_scale=1.0, condition_area=AREA,
        max_text_length=48, resolution=H,
    )  # fmt: skip
    ours = policy.rollout(sources, ["make it red"], generator=torch.Generator().manual_seed(0))
    pil = Image.fromarray((sources[0].permute(1, 2, 0) * 255).round().byte().numpy())
    theirs = qwen_pipe(
        image=pil, prompt="make it red", true_cfg_scale=1.0, height=H, width=W, num_inference_steps=3,
        output_type="pt", generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert ours.images.shape == theirs.shape == (1, 3, H, W)
    assert (ours.images - theirs).abs().max() < 1e-4
