"""Qwen-Image-Edit as an edit policy: flow-matching SDE rollouts with per-step log-probabilities.

The model calls follow diffusers' `QwenImageEditPipeline.__call__` (v0.42): the source is resized to
the condition size (`calculate_dimensions` of an area, about 1 Mpx in the pipeline, `condition_area`
here), Qwen2.5-VL reads the instruction in the pipeline's prompt template together with that image
(the pipeline's own `encode_prompt`), the source's VAE latents (`AutoencoderKLQwenImage`, mode,
normalised by `latents_mean` / `latents_std`) are packed into 2 x 2 tokens and joined after the noisy
tokens (`img_shapes` gives both grids to the RoPE), and true classifier-free guidance runs the
negative prompt: v = v_neg + s (v_cond - v_neg), rescaled per token to the norm of v_cond. What
changed: the pipeline's Euler step is `flow_base.FlowEditPolicy`'s loop (Flow-GRPO's SDE or CPS with
log-probs; the ODE at noise level 0), the conditional and negative branches run as one batch, each
item may sit at its own step, the text embeddings are padded to a fixed length (a `Rollout` of
several batches concatenates), and latents stay unpacked (N, C, h, w) in the `Rollout`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sampler.editors.flow_base import FlowEditPolicy

PIPELINE_CONDITION_AREA = (
    1024 * 1024
)  # QwenImageEditPipeline.__call__: calculate_dimensions(1024 * 1024, ...)


def load_qwen_edit(pretrained: str, revision: str | None = None, dtype: torch.dtype = torch.float32):
    """A `QwenImageEditPipeline` from a hub id or a local folder (`from_pretrained`), frozen, in eval mode."""
    from diffusers import QwenImageEditPipeline

    from sampler.editors.qwen_processor import load_processor

    local = Path(pretrained).expanduser().is_dir()
    name = str(Path(pretrained).expanduser()) if local else pretrained
    kwargs = {} if local else {"revision": revision}
    pipe = QwenImageEditPipeline.from_pretrained(
        name, dtype=dtype, processor=load_processor(name, None if local else revision), **kwargs
    )
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False).eval()
    return pipe


def condition_size(area: int, height: int, width: int) -> tuple[int, int]:
    """(height, width) the pipeline resizes a height x width source to: `calculate_dimensions(area,
    width / height)`, multiples of 32."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    w, h, _ = calculate_dimensions(area, width / height)
    if h <= 0 or w <= 0:
        raise ValueError(f"condition area {area} gives a {h} x {w} condition image (at least 32 x 32 needed)")
    return int(h), int(w)


class QwenEditPolicy(FlowEditPolicy):
    """A Qwen-Image-Edit model that samples edits and scores its own recorded steps.

    Args:
        pipe: a loaded `QwenImageEditPipeline` (`load_qwen_edit`); only its components are used.
        num_steps: denoising steps T.
        noise_level: the SDE's noise level a (0: the ODE, for evaluation).
        sde_kind: "sde" (Flow-GRPO) or "cps" (coefficients-preserving).
        true_cfg_scale: s of true CFG (the pipeline's default 4.0); <= 1 runs the instruction alone.
        negative_prompt: the negative branch's text (" ", as Qwen-Image-Edit's model card).
        condition_area: pixels of the condition image (the pipeline's 1024 * 1024; small for tiny runs).
        max_text_length: L, the padded length of the text embeddings (longer prompts are refused).
        resolution: image side in pixels (the schedule's resolution shift depends on it).
        device: where the models run.
    """

    COND_FIELDS = ("text_embeds", "text_mask", "image_latents")

    def __init__(
        self,
        pipe,
        num_steps: int = 28,
        noise_level: float = 0.7,
        sde_kind: str = "sde",
        true_cfg_scale: float = 4.0,
        negative_prompt: str = " ",
        condition_area: int = PIPELINE_CONDITION_AREA,
        max_text_length: int = 1024,
        resolution: int = 512,
        device: str | torch.device = "cpu",
    ) -> None:
        self.c = pipe
        self.device = torch.device(device)
        self.num_steps, self.noise_level, self.sde_kind = num_steps, noise_level, sde_kind
        self.true_cfg_scale, self.negative_prompt = true_cfg_scale, negative_prompt
        self.condition_area, self.max_text_length = condition_area, max_text_length
        self.resolution = resolution
        self.vae_factor = int(pipe.vae_scale_factor)
        for module in (pipe.transformer, pipe.vae, pipe.text_encoder):
            module.to(self.device)
        self._init_caches()
        z = pipe.vae.config.z_dim
        self._mean = torch.tensor(pipe.vae.config.latents_mean).view(1, z, 1, 1).to(self.device)
        self._std = torch.tensor(pipe.vae.config.latents_std).view(1, z, 1, 1).to(self.device)

    @property
    def cfg(self) -> bool:
        """Whether true CFG runs (scale > 1), as the pipeline decides with a negative prompt given."""
        return self.true_cfg_scale > 1

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents for resolution x resolution images."""
        side = resolution // self.vae_factor
        return (int(self.c.vae.config.z_dim), side, side)

    # ------------------------------------------------------------------ encoders

    def condition_images(self, sources: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) in [0, 1] -> (M, 3, h_c, w_c) at the condition size (unchanged if already there).

        Resized as `QwenImageEditPipeline.__call__` does (diffusers v0.42, `image_processor.resize` of
        the PIL input: PIL's Lanczos, the `VaeImageProcessor`'s default `resample`), from the 8-bit
        image, so a model trained here sees the condition diffusers' inference gives it.
        """
        from PIL import Image

        h, w = condition_size(self.condition_area, *sources.shape[-2:])
        if tuple(sources.shape[-2:]) == (h, w):
            return sources.float()
        arrays = (
            (sources.float().permute(0, 2, 3, 1).cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)
        )
        resized = [np.asarray(self.c.image_processor.resize(Image.fromarray(a), h, w)) for a in arrays]
        return (torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 255).to(sources.device)

    @torch.no_grad()
    def encode_text(self, instructions: list[str], images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Instructions (and the negative prompt) read with their condition images by Qwen2.5-VL.

        Args:
            instructions: M instructions.
            images: (M, 3, h_c, w_c) condition images in [0, 1] (given to the processor as 8-bit
                images, as the pipeline's PIL images are).

        Returns:
            embeds (M, B, L, D) and mask (M, B, L) float (1 = token), B = 2 with true CFG
            ([instruction, negative prompt]) else 1, padded with zeros to L = max_text_length.
        """
        from PIL import Image

        arrays = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().clip(0, 255).astype(np.uint8)
        pil = [Image.fromarray(a) for a in arrays]
        prompts = [list(instructions)] + ([[self.negative_prompt] * len(pil)] if self.cfg else [])
        embeds, masks = [], []
        for texts in prompts:
            e, mask = self.c.encode_prompt(prompt=texts, image=pil, device=self.device)
            mask = torch.ones(e.shape[:2], device=e.device) if mask is None else mask.float()
            if e.shape[1] > self.max_text_length:
                raise ValueError(
                    f"a prompt of {e.shape[1]} tokens (with its vision tokens) is longer than "
                    f"model.text_length={self.max_text_length}"
                )
            pad = self.max_text_length - e.shape[1]
            embeds.append(F.pad(e, (0, 0, 0, pad)))
            masks.append(F.pad(mask, (0, pad)))
        return torch.stack(embeds, dim=1), torch.stack(masks, dim=1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) in [0, 1] -> (M, C, H/f, W/f) normalised latents, as `_encode_vae_image`."""
        vae = self.c.vae
        z = vae.encode((images.to(self.device, vae.dtype) * 2 - 1).unsqueeze(2)).latent_dist.mode()
        return ((z[:, :, 0].float() - self._mean) / self._std).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) final latents -> (N, 3, H, W) images in [0, 1]."""
        vae = self.c.vae
        z = (latents * self._std + self._mean).unsqueeze(2).to(vae.dtype)
        return (vae.decode(z).sample[:, :, 0] / 2 + 0.5).clamp(0, 1).float()

    def encode(self, sources: torch.Tensor, instructions: list[str]) -> dict[str, torch.Tensor]:
        """M inputs -> text_embeds (M, B, L, D), text_mask (M, B, L), image_latents (M, C, h_c, w_c)."""
        images = self.condition_images(sources)
        embeds, mask = self.encode_text(instructions, images)
        return {"text_embeds": embeds, "text_mask": mask, "image_latents": self.encode_images(images)}

    # ------------------------------------------------------------------ one prediction

    def velocity(self, latents: torch.Tensor, index: torch.Tensor, cond) -> torch.Tensor:
        """The guided velocity for B latents, each at its own step.

        Args:
            latents: (B, C, h, w) x_sigma.
            index: (B,) long step positions in the schedule.
            cond: text_embeds (B, K, L, D) and text_mask (B, K, L) for K branches (instruction,
                negative prompt), image_latents (B, C, h_c, w_c) normalised source latents.

        Returns:
            (B, C, h, w) v: with true CFG, v_neg + s (v_cond - v_neg) times |v_cond| / |that| per token.
        """
        pipe, model = self.c, self.c.transformer
        embeds, mask, image_latents = cond["text_embeds"], cond["text_mask"], cond["image_latents"]
        b, c, h, w = latents.shape
        k = embeds.shape[1] if self.cfg else 1
        length = max(
            int(mask[:, :k].sum(-1).max()), 1
        )  # the longest prompt of the batch, as the pipeline pads
        text = embeds[:, :k, :length].transpose(0, 1).reshape(k * b, length, -1)
        text_mask = mask[:, :k, :length].transpose(0, 1).reshape(k * b, length)
        noisy = pipe._pack_latents(latents, b, c, h, w)
        source = pipe._pack_latents(image_latents, b, c, *image_latents.shape[2:])
        shapes = [[(1, h // 2, w // 2), (1, image_latents.shape[2] // 2, image_latents.shape[3] // 2)]] * (
            k * b
        )
        t = self.schedule(h, w).timesteps[index].to(latents.dtype) / 1000
        dtype = model.dtype
        out = model(
            hidden_states=torch.cat([noisy, source], dim=1).repeat(k, 1, 1).to(dtype),
            timestep=t.repeat(k).to(dtype),
            encoder_hidden_states=text.to(self.device, dtype),
            encoder_hidden_states_mask=None if bool(text_mask.all()) else text_mask.to(self.device),
            img_shapes=shapes,
            return_dict=False,
        )[0][:, : noisy.shape[1]].float()
        v = out[:b]
        if k == 2:  # QwenImageEditPipeline.__call__'s true CFG and its norm rescale, per token
            neg = out[b:]
            comb = neg + self.true_cfg_scale * (v - neg)
            v = comb * (v.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
        return pipe._unpack_latents(v, h * self.vae_factor, w * self.vae_factor, self.vae_factor)[:, :, 0]


# ---- the editor contract (`sampler.editors`): what the registry's "qwen_image_edit" provides ----

FAMILY = "qwen_image_edit"
FLOW_MATCHING = True  # sample.noise_level and sample.sde_kind apply
PIPELINE_CLASS = "QwenImageEditPipeline"
TINY_NAME = "tiny-qwen-edit"
# Qwen-Image's MMDiT blocks name their attention projections as FLUX's do (diffusers'
# `QwenImageTransformer2DModel._tp_plan`, DiffSynth's Qwen-Image LoRA).
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
load = load_qwen_edit


def tiny_model(tiny_dir: str, seed: int) -> str:
    """The seeded tiny Qwen-Image-Edit, built once under `tiny_dir`."""
    from sampler.editors.tiny_qwen_edit import save_tiny_qwen_edit

    return str(save_tiny_qwen_edit(Path(tiny_dir) / f"qwen-edit-seed{seed}", seed=seed))


def make_policy(pipe, model, sample, **common) -> QwenEditPolicy:
    """The policy of a loaded pipeline; `model` / `sample` are the run's config sections. A bad
    `model.condition_area` raises ValueError naming it."""
    area = model.condition_area or PIPELINE_CONDITION_AREA
    try:
        condition_size(area, model.resolution, model.resolution)
    except ValueError as err:
        raise ValueError(f"model.condition_area: {err}") from err
    return QwenEditPolicy(
        pipe,
        true_cfg_scale=sample.guidance_scale,
        negative_prompt=sample.negative_prompt,
        condition_area=area,
        max_text_length=model.text_length,
        **common,
    )
