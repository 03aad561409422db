"""Qwen-Image-Edit behind the editor contract: diffusers equality at noise 0 (true CFG with its norm
rescale), recomputed log-probs (ratio 1, also across concatenated batches), the model folder's family
and the tiny model's tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from sampler.editors import editor_family
from sampler.editors.qwen_edit import PIPELINE_CONDITION_AREA, QwenEditPolicy, condition_size, load_qwen_edit
from sampler.editors.tiny_qwen_edit import save_tiny_qwen_edit, template_prefix_tokens
from sampler.rollout import Rollout

RES = 32  # 32 px: 4 x 4 latents, 4 image tokens (the smallest the pipeline's 32-px rounding allows)


@pytest.fixture(scope="module")
def qwen_pipe(tmp_path_factory):
    """The tiny Qwen-Image-Edit saved with `save_pretrained` and loaded back with `from_pretrained`."""
    return load_qwen_edit(
        str(save_tiny_qwen_edit(tmp_path_factory.mktemp("qwen-edit"), seed=0, vae_warmup_steps=0))
    )


def _inputs(m: int = 2):
    """8-bit sources (the pipeline reads PIL images) and instructions of different token counts."""
    sources = torch.randint(0, 256, (m, 3, RES, RES), generator=torch.Generator().manual_seed(1)) / 255
    return sources.float(), ["make it red", "remove the blue square in the background"][:m]


def _policy(pipe, kind: str, noise_level: float, cfg: float = 4.0) -> QwenEditPolicy:
    return QwenEditPolicy(
        pipe, num_steps=3, noise_level=noise_level, sde_kind=kind, true_cfg_scale=cfg,
        condition_area=RES * RES, max_text_length=48, resolution=RES,
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_noise_level_zero_equals_the_diffusers_pipeline(qwen_pipe, kind, monkeypatch):
    """At noise level 0 our edits equal QwenImageEditPipeline's for the same model, generator, steps,
    true CFG scale 4 and negative prompt (to 1e-4), with no log-probability.

    The one change to the pipeline: its condition area. `__call__` resizes every source to
    `calculate_dimensions(1024 * 1024, ratio)` (a 1024 x 1024 condition image, 4096 source tokens:
    about a minute per call on this model on CPU); the test makes that function see a 32 x 32 area,
    and our policy is given the same `condition_area`. At its default our policy uses the
    pipeline's size (checked first)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as module

    assert condition_size(PIPELINE_CONDITION_AREA, 512, 512) == (1024, 1024)
    assert (
        condition_size(PIPELINE_CONDITION_AREA, 300, 600)[::-1]
        == module.calculate_dimensions(PIPELINE_CONDITION_AREA, 2.0)[:2]
    )
    original = module.calculate_dimensions
    monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio: original(RES * RES, ratio))
    sources, instructions = _inputs()
    policy = _policy(qwen_pipe, kind, 0.0)
    ours = policy.rollout(sources, instructions, generator=torch.Generator().manual_seed(0))
    pil = [Image.fromarray((s.permute(1, 2, 0) * 255).round().byte().numpy()) for s in sources]
    theirs = qwen_pipe(
        image=pil, prompt=instructions, negative_prompt=[" "] * 2, true_cfg_scale=4.0, height=RES,
        width=RES, num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert ours.images.shape == theirs.shape == (2, 3, RES, RES)
    assert (ours.images - theirs).abs().max() < 1e-4
    assert ours.images.std() > 0.01  # not a constant image
    assert not ours.stochastic.any() and (ours.log_probs == 0).all()
    # Without CFG (scale 1) the negative branch is not run, as in the pipeline.
    plain = _policy(qwen_pipe, kind, 0.0, cfg=1.0)
    ours1 = plain.rollout(sources, instructions, generator=torch.Generator().manual_seed(0))
    theirs1 = qwen_pipe(
        image=pil, prompt=instructions, true_cfg_scale=1.0, height=RES, width=RES, num_inference_steps=3,
        output_type="pt", generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert ours1.text_embeds.shape[1] == 1 and (ours1.images - theirs1).abs().max() < 1e-4
    assert (ours1.images - ours.images).abs().max() > 1e-3  # CFG changes the edit


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_recomputed_log_probs_equal_the_recorded_ones(qwen_pipe, kind):
    """Every recorded step of 4 edits (2 inputs x 2), scored again under the same weights: ratio 1;
    also per-item mixed steps, and a batch concatenated from two rollouts whose prompts differ in length."""
    sources, instructions = _inputs()
    policy = _policy(qwen_pipe, kind, 0.7)
    r = policy.rollout(sources, instructions, nb_gen=2, generator=torch.Generator().manual_seed(0))
    assert r.latents.shape == (4, 4, 4, 4, 4) and r.text_embeds.shape == (4, 2, 48, 16)
    lengths = r.text_mask.sum(-1)
    assert lengths[0, 0] < lengths[2, 0] and (lengths[:, 1] == lengths[0, 1]).all()
    assert r.log_probs[:, r.stochastic].abs().min() > 0
    again = torch.stack([policy.step_log_prob(r, j) for j in range(3)], dim=1)
    torch.testing.assert_close(again, r.log_probs, rtol=0, atol=1e-5)
    mixed = torch.tensor([2, 0, 1, 2])
    torch.testing.assert_close(
        policy.step_log_prob(r, mixed), r.log_probs[torch.arange(4), mixed], atol=1e-5, rtol=0
    )
    short = policy.rollout(
        sources[:1], instructions[:1], nb_gen=2, generator=torch.Generator().manual_seed(5)
    )
    both = Rollout.concat([short, r])  # the short prompt's items now run beside the long one's
    again = torch.stack([policy.step_log_prob(both, j) for j in range(3)], dim=1)
    torch.testing.assert_close(again, both.log_probs, rtol=0, atol=1e-5)


def test_the_model_folder_names_its_family(qwen_pipe, tmp_path):
    """`model.editor: auto` reads model_index.json's `_class_name`; the tiny tokenizer splits the
    pipeline's template so that its dropped prefix (64 tokens) is exactly the system turn; a prompt
    longer than the padded text length is refused, naming the setting."""
    folder = tmp_path / "m"
    qwen_pipe.save_pretrained(folder)
    assert editor_family(str(folder)) == "qwen_image_edit"
    assert editor_family("tiny-qwen-edit") == "qwen_image_edit"
    assert template_prefix_tokens(qwen_pipe.tokenizer, qwen_pipe.prompt_template_encode) == 64
    assert qwen_pipe.prompt_template_encode_start_idx == 64
    tight = QwenEditPolicy(qwen_pipe, max_text_length=4, condition_area=RES * RES, resolution=RES)
    with pytest.raises(ValueError, match="longer than model.text_length=4"):
        tight.rollout(*_inputs())
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "QwenImageEditPlusPipeline"}))
    with pytest.raises(ValueError, match="unknown pipeline 'QwenImageEditPlusPipeline'"):
        editor_family(str(folder))
