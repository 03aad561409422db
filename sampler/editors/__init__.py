"""Edit policies behind one contract, and which family a model folder belongs to.

The contract (met by `sampler.policy.EditPolicy`, InstructPix2Pix, and by
`sampler.editors.kontext.KontextPolicy`, FLUX.1 Kontext, and `sampler.editors.qwen_edit.QwenEditPolicy`,
Qwen-Image-Edit; the flow families share `sampler.editors.flow_base.FlowEditPolicy`):

- `rollout(sources, instructions, nb_gen, generator, shared_noise, exemplars, masks, progress,
  policy_version) -> Rollout`: edits as images, with per-step latents (N, T + 1, C, h, w), step
  indices and log-probs (N, T); the noise is drawn as x_T, then one draw per step (epoch plans
  replay it, `trainer.engine.shards.plan_epoch`).
- `step_log_prob(batch, j) -> (B,)`: any recorded step's log-prob under the current weights (with grad).
- `forward_x0(batch, index, noise) -> (B, C, h, w)`: the final latents noised to step `index`'s
  level on the forward process and predicted back (with grad): the likelihood-free objectives'
  (DiffusionNFT) one model call.
- `denoiser` (settable) and `denoiser_name`: the trained network ("unet" / "transformer"), whose
  parameters the learner and checkpoints name `<denoiser_name>.<parameter>`.
- `sched.step_is_stochastic() -> (T,) bool`, `latent_shape(resolution) -> (C, h, w)`, `eval_mode()`,
  `device`, `exemplar` (None unless exemplar conditioning).
"""

from __future__ import annotations

import json
from pathlib import Path

from sampler.models import looks_local

# model_index.json `_class_name` -> editor family.
PIPELINE_FAMILIES = {
    "StableDiffusionInstructPix2PixPipeline": "instruct_pix2pix",
    "FluxKontextPipeline": "flux_kontext",
    "QwenImageEditPipeline": "qwen_image_edit",
}
TINY_FAMILIES = {
    "tiny": "instruct_pix2pix",
    "tiny-kontext": "flux_kontext",
    "tiny-qwen-edit": "qwen_image_edit",
}


def editor_family(pretrained: str, editor: str = "auto", revision: str | None = None) -> str:
    """The editor family of a model: `editor` unless "auto", else its `model_index.json` `_class_name`.

    Args:
        pretrained: "tiny", "tiny-kontext", "tiny-qwen-edit", a local folder, or a hub id (its model_index.json is fetched).
        editor: "auto" or a family name.
    """
    if editor != "auto":
        return editor
    if pretrained in TINY_FAMILIES:
        return TINY_FAMILIES[pretrained]
    folder = Path(pretrained).expanduser()
    index = folder / "model_index.json"
    if folder.is_dir() and not index.is_file():
        raise ValueError(f"{pretrained}: no model_index.json (set model.editor)")
    if not folder.is_dir():
        if looks_local(pretrained):
            raise FileNotFoundError(f"model folder not found: {pretrained}")
        try:
            from huggingface_hub import hf_hub_download

            index = Path(hf_hub_download(pretrained, "model_index.json", revision=revision))
        except Exception:  # offline, or no such repo: the default family's loader reports it
            return "instruct_pix2pix"
    name = json.loads(index.read_text()).get("_class_name", "")
    if name not in PIPELINE_FAMILIES:
        raise ValueError(f"{index}: unknown pipeline {name!r} (known: {sorted(PIPELINE_FAMILIES)})")
    return PIPELINE_FAMILIES[name]
