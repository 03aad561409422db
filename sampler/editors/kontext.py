"""FLUX.1 Kontext as an edit policy: flow-matching SDE rollouts with per-step log-probabilities.

The model calls follow diffusers' `FluxKontextPipeline.__call__` (v0.42): the instruction is encoded by
CLIP (pooled) and T5 (sequence), the source image's VAE latents are packed into 2 x 2 patch tokens and
joined after the noisy latents' tokens (position ids with first coordinate 1), the distilled guidance
scale is the transformer's `guidance` input, and the velocity of the noisy tokens is kept. What
changed: the pipeline's Euler step is replaced by `FlowMatchSDE` (`flow_base.FlowEditPolicy`'s loop: Flow-GRPO's SDE or CPS, with
log-probs; the ODE at noise level 0), each item may sit at its own step, and latents are kept
unpacked (N, C, h, w) in the `Rollout`, as InstructPix2Pix's are, so everything downstream is shared.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sampler.editors.flow_base import FlowEditPolicy


def load_kontext(pretrained: str, revision: str | None = None, dtype: torch.dtype = torch.float32):
    """A `FluxKontextPipeline` from a hub id or a local folder (`from_pretrained`), frozen, in eval mode."""
    from diffusers import FluxKontextPipeline

    local = Path(pretrained).expanduser().is_dir()
    kwargs = {} if local else {"revision": revision}
    pipe = FluxKontextPipeline.from_pretrained(
        str(Path(pretrained).expanduser()) if local else pretrained, dtype=dtype, **kwargs
    )
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False).eval()
    return pipe


class KontextPolicy(FlowEditPolicy):
    """A FLUX.1 Kontext model that samples edits and scores its own recorded steps.

    Args:
        pipe: a loaded `FluxKontextPipeline` (`load_kontext`); only its components are used.
        num_steps: denoising steps T.
        noise_level: the SDE's noise level a (0: the ODE, for evaluation).
        sde_kind: "sde" (Flow-GRPO) or "cps" (coefficients-preserving).
        guidance_scale: the distilled guidance input (FluxKontextPipeline's default is 3.5).
        resolution: image side in pixels (the schedule's resolution shift depends on it).
        device: where the models run.
    """

    COND_FIELDS = ("text_embeds", "pooled_embeds", "image_latents")

    def __init__(
        self,
        pipe,
        num_steps: int = 28,
        noise_level: float = 0.7,
        sde_kind: str = "sde",
        guidance_scale: float = 3.5,
        resolution: int = 512,
        device: str | torch.device = "cpu",
    ) -> None:
        self.c = pipe
        self.device = torch.device(device)
        self.num_steps, self.noise_level, self.sde_kind = num_steps, noise_level, sde_kind
        self.guidance_scale = guidance_scale
        self.resolution = resolution
        self.vae_factor = int(pipe.vae_scale_factor)
        self.max_text_length = min(512, int(pipe.tokenizer_2.model_max_length))
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.to(self.device)
        self._init_caches()
        self._id_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents for resolution x resolution images."""
        side = resolution // self.vae_factor
        return (int(self.c.vae.config.latent_channels), side, side)

    # ------------------------------------------------------------------ encoders

    @torch.no_grad()
    def encode_text(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """N instructions -> T5 sequence (N, L, D) and CLIP pooled (N, P) embeddings (`encode_prompt`)."""
        embeds, pooled, _ = self.c.encode_prompt(
            prompt=list(instructions),
            prompt_2=None,
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_text_length,
        )
        return embeds, pooled

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, C, H/f, W/f) normalised latents, as `_encode_vae_image`."""
        vae = self.c.vae
        z = vae.encode(images.to(self.device, vae.dtype) * 2 - 1).latent_dist.mode()
        return ((z - vae.config.shift_factor) * vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) final latents -> (N, 3, H, W) images in [0, 1]."""
        vae = self.c.vae
        z = latents / vae.config.scaling_factor + vae.config.shift_factor
        return (vae.decode(z.to(vae.dtype)).sample / 2 + 0.5).clamp(0, 1).float()

    # ------------------------------------------------------------------ one prediction

    def _ids(self, h: int, w: int, text_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids (cached): (2 * h/2 * w/2, 3) for the noisy then the source tokens (first
        coordinate 0, then 1), and (text_len, 3) zeros for the text, as the pipeline makes them."""
        key = (h, w, text_len, dtype)
        if key not in self._id_cache:
            ids = self.c._prepare_latent_image_ids(1, h // 2, w // 2, self.device, dtype)
            image_ids = ids.clone()
            image_ids[..., 0] = 1
            text = torch.zeros(text_len, 3, device=self.device, dtype=dtype)
            self._id_cache[key] = (torch.cat([ids, image_ids], dim=0), text)
        return self._id_cache[key]

    def encode(self, sources: torch.Tensor, instructions: list[str]) -> dict[str, torch.Tensor]:
        """M inputs -> text_embeds (M, L, D), pooled_embeds (M, P), image_latents (M, C, h, w)."""
        text, pooled = self.encode_text(instructions)
        return {"text_embeds": text, "pooled_embeds": pooled, "image_latents": self.encode_images(sources)}

    def velocity(self, latents: torch.Tensor, index: torch.Tensor, cond) -> torch.Tensor:
        """The transformer's velocity for B latents, each at its own step.

        Args:
            latents: (B, C, h, w) x_sigma.
            index: (B,) long step positions in the schedule.
            cond: text_embeds (B, L, D) T5 embeddings, pooled_embeds (B, P) CLIP pooled embeddings,
                image_latents (B, C, h, w) normalised source latents.

        Returns:
            (B, C, h, w) v.
        """
        text_embeds, pooled_embeds = cond["text_embeds"], cond["pooled_embeds"]
        image_latents = cond["image_latents"]
        pipe, model = self.c, self.c.transformer
        b, c, h, w = latents.shape
        dtype = model.dtype
        noisy = pipe._pack_latents(latents, b, c, h, w)
        source = pipe._pack_latents(image_latents, b, c, h, w)
        img_ids, txt_ids = self._ids(h, w, text_embeds.shape[1], dtype)
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance_scale, device=self.device, dtype=torch.float32)
        t = self.schedule(h, w).timesteps[index].to(latents.dtype)
        out = model(
            hidden_states=torch.cat([noisy, source], dim=1).to(dtype),
            timestep=(t / 1000).to(dtype),
            guidance=guidance,
            pooled_projections=pooled_embeds.to(dtype),
            encoder_hidden_states=text_embeds.to(dtype),
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0][:, : noisy.shape[1]]
        return pipe._unpack_latents(out.float(), h * self.vae_factor, w * self.vae_factor, self.vae_factor)


# ---- the editor contract (`sampler.editors`): what the registry's "flux_kontext" provides ----

FAMILY = "flux_kontext"
FLOW_MATCHING = True  # sample.noise_level and sample.sde_kind apply
PIPELINE_CLASS = "FluxKontextPipeline"
TINY_NAME = "tiny-kontext"
# The transformer's attention projections: the image stream's q/k/v/out and the text stream's
# (`add_*_proj`, `to_add_out`), as Flow-GRPO's FLUX LoRA targets them.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
load = load_kontext


def tiny_model(tiny_dir: str, seed: int) -> str:
    """The seeded tiny FLUX.1 Kontext, built once under `tiny_dir`."""
    from sampler.editors.tiny_kontext import save_tiny_kontext

    return str(save_tiny_kontext(Path(tiny_dir) / f"kontext-seed{seed}", seed=seed))


def make_policy(pipe, model, sample, **common) -> KontextPolicy:
    """The policy of a loaded pipeline; `model` / `sample` are the run's config sections."""
    return KontextPolicy(pipe, guidance_scale=sample.guidance_scale, **common)
