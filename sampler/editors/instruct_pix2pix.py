"""InstructPix2Pix behind the editor contract (`sampler.editors`): the policy is
`sampler.policy.EditPolicy` (a UNet with DDIM / Euler-ancestral steps that record log-probs), the
loader `sampler.models.load_components`, the tiny builder `sampler.tiny`."""

from __future__ import annotations

from sampler.models import load_components, resolve_pretrained
from sampler.policy import EditPolicy

FAMILY = "instruct_pix2pix"
FLOW_MATCHING = False  # sample.eta and model.scheduler apply; exemplar conditioning is possible
PIPELINE_CLASS = "StableDiffusionInstructPix2PixPipeline"
TINY_NAME = "tiny"
# The UNet's attention projections.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
load = load_components
Policy = EditPolicy


def tiny_model(tiny_dir: str, seed: int) -> str:
    """The seeded tiny InstructPix2Pix, built once under `tiny_dir`."""
    return resolve_pretrained(TINY_NAME, tiny_dir, seed=seed)
