"""Edit policies behind one contract, the registry of editor families, and which family a model
folder belongs to.

The registry maps a family name (`model.editor`) to its editor module: the built-ins of `EDITORS`, and
other packages' through the entry point group `spie.editors` (`<family> = "<module>"`). An editor
module provides:

- `FAMILY` (its name), `PIPELINE_CLASS` (its model_index.json `_class_name`), `TINY_NAME` (the
  `model.pretrained` value of its seeded tiny model) and `FLOW_MATCHING` (True: a flow-matching
  editor built by `trainer.engine.flow_policy` through `load` and `make_policy`);
- `LORA_TARGETS`: the module names of the denoiser that LoRA adapts;
- `load(path, revision, dtype_or_scheduler)`: the frozen pipeline (or components);
- `tiny_model(tiny_dir, seed) -> path`: the seeded tiny model, built once;
- flow editors: `make_policy(pipe, model, sample, **common)`: the policy (`model`, `sample`: the
  run's config sections; a bad setting raises ValueError naming it);
- the policy itself meets the contract below: it encodes the condition (`encode`), takes one step
  with its log-prob (`rollout`, `step_log_prob`) and decodes (`decode`).

The policy contract (met by `sampler.policy.EditPolicy`, InstructPix2Pix, and by
`sampler.editors.kontext.KontextPolicy`, FLUX.1 Kontext, and `sampler.editors.qwen_edit.QwenEditPolicy`,
Qwen-Image-Edit; the flow families share `sampler.editors.flow_base.FlowEditPolicy`):

- `rollout(sources, instructions, nb_gen, generator, shared_noise, exemplars, masks, progress,
  policy_version) -> Rollout`: edits as images, with per-step latents (N, T + 1, C, h, w), step
  indices and log-probs (N, T); the noise is drawn as x_T, then one draw per step (epoch plans
  replay it, `trainer.engine.shards.plan_epoch`).
- `step_log_prob(batch, j) -> (B,)`: any recorded step's log-prob under the current weights (with grad).
- `forward_x0(batch, index, noise) -> (B, C, h, w)`: the final latents noised to step `index`'s
  level on the forward process and predicted back (with grad): the likelihood-free objectives'
  (DiffusionNFT) one model call; with `with_output=True`, (x0, the network's output: velocity or
  noise), whose squared distance to the reference's is DiffusionNFT's KL (needed only with
  `train.kl_coef > 0`).
- `denoiser` (settable) and `denoiser_name`: the trained network ("unet" / "transformer"), whose
  parameters the learner and checkpoints name `<denoiser_name>.<parameter>`.
- `sched.step_is_stochastic() -> (T,) bool`, `latent_shape(resolution) -> (C, h, w)`, `eval_mode()`,
  `device`, `exemplar` (None unless exemplar conditioning).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

from sampler.models import looks_local

ENTRY_POINT_GROUP = "spie.editors"
# Family -> the module that implements the editor contract.
EDITORS = {
    "instruct_pix2pix": "sampler.editors.instruct_pix2pix",
    "flux_kontext": "sampler.editors.kontext",
    "qwen_image_edit": "sampler.editors.qwen_edit",
}

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


def _plugins() -> dict:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in EDITORS}


def editor_names() -> list[str]:
    """Every family `model.editor` may name: the built-ins and the plugins."""
    return sorted(set(EDITORS) | set(_plugins()))


def load_editor(family: str) -> ModuleType:
    """The editor module of `family` (ValueError if no editor is registered under it)."""
    if family in EDITORS:
        return importlib.import_module(EDITORS[family])
    ep = _plugins().get(family)
    if ep is None:
        raise ValueError(f"model.editor={family}: not supported ({', '.join(editor_names())})")
    module = ep.load()
    if getattr(module, "FAMILY", family) != family:
        raise ValueError(f"editor entry point {family!r} names a module of family {module.FAMILY!r}")
    return module
