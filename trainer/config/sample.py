"""The `sample` section: how rollouts are sampled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class SampleConfig:
    # Denoising steps per rollout.
    num_steps: int = 20
    # DDIM eta (0: deterministic, 1: DDPM-like variance). Log-probs need eta > 0.
    eta: float = 1.0
    # Text classifier-free guidance scale (FLUX.1 Kontext: the distilled guidance input, 3.5 in its
    # pipeline; Qwen-Image-Edit: true CFG against sample.negative_prompt, 4.0 in its pipeline).
    guidance_scale: float = 7.5
    # Flow editors: the SDE's noise level a (Flow-GRPO's sigma_t = a sqrt(t / (1 - t)); CPS's
    # sin(a pi / 2)); 0 is the deterministic ODE (evaluation: `--set sample.noise_level=0`).
    noise_level: float = 0.7
    # Flow editors: "sde" (Flow-GRPO's SDE) or "cps" (coefficients-preserving sampling, arXiv 2509.05952).
    sde_kind: Literal["sde", "cps"] = "sde"
    # With sde_kind "cps", the step's log-prob: "flow_grpo" (Flow-GRPO's -mean((x - mean)^2), its
    # `sd3_sde_with_logprob.py` lines 85-86 at 54809b5) or "gaussian" (the exact log-density; its
    # 1 / (2 std^2) factor grows as the noise falls, so late steps weigh more in the ratio).
    cps_log_prob: Literal["flow_grpo", "gaussian"] = "flow_grpo"
    # Qwen-Image-Edit: the negative prompt of true CFG (" " as its model card and Flow-GRPO use).
    negative_prompt: str = " "
    # Source-image classifier-free guidance scale.
    image_guidance_scale: float = 1.5
    # Exemplar-image guidance scale (only with model.exemplar_conditioning).
    exemplar_guidance_scale: float = 3.0
    # (source, instruction) inputs per sampling batch, per process.
    batch_size: int = 4
    # Sampling batches per epoch, per process.
    num_batches_per_epoch: int = 2
    # Edits generated per (source, instruction): the group size for advantages and rankings.
    nb_gen: int = 2
    # The nb_gen edits of an input start from the same initial noise (True) or independent noise.
    shared_noise: bool = False
    # "async": each sampling batch is scored (on a background thread, through the reward servers
    # or in process) while the next one is sampled, so sampling and scoring overlap; "sync": the
    # whole epoch is sampled, then scored. Both give the same edits, scores and updates.
    pipeline: Literal["sync", "async"] = "async"
