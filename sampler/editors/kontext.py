"""FLUX.1 Kontext as an edit policy: flow-matching SDE rollouts with per-step log-probabilities.

The model calls follow diffusers' `FluxKontextPipeline.__call__` (v0.42): the instruction is encoded by
CLIP (pooled) and T5 (sequence), the source image's VAE latents are packed into 2 x 2 patch tokens and
joined after the noisy latents' tokens (position ids with first coordinate 1), the distilled guidance
scale is the transformer's `guidance` input, and the velocity of the noisy tokens is kept. What
changed: the pipeline's Euler step is replaced by `FlowMatchSDE` (Flow-GRPO's SDE or CPS, with
log-probs; the ODE at noise level 0), each item may sit at its own step, and latents are kept
unpacked (N, C, h, w) in the `Rollout`, as InstructPix2Pix's are, so everything downstream is shared.
"""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from sampler.editors.flow_sde import FlowMatchSDE
from sampler.policy import randn
from sampler.rollout import Rollout


def load_kontext(pretrained: str, revision: str | None = None, dtype: torch.dtype = torch.float32):
    """A `FluxKontextPipeline` from a hub id or a local folder (`from_pretrained`), frozen, in eval mode."""
    from pathlib import Path

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


class KontextPolicy:
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

    denoiser_name = "transformer"
    exemplar = None  # no exemplar conditioning on this family

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
        self._schedules: dict[int, FlowMatchSDE] = {}
        self._id_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ the contract's parts

    @property
    def denoiser(self) -> torch.nn.Module:
        """The trained network (the transformer)."""
        return self.c.transformer

    @denoiser.setter
    def denoiser(self, module: torch.nn.Module) -> None:
        self.c.transformer = module

    unet = denoiser  # the name the InstructPix2Pix policy's callers use

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents for resolution x resolution images."""
        side = resolution // self.vae_factor
        return (int(self.c.vae.config.latent_channels), side, side)

    def schedule(self, h: int, w: int) -> FlowMatchSDE:
        """The step schedule for (h, w) latents (FLUX shifts it by the number of image tokens)."""
        seq_len = (h // 2) * (w // 2)
        if seq_len not in self._schedules:
            self._schedules[seq_len] = FlowMatchSDE(
                self.c.scheduler, self.num_steps, seq_len, self.sde_kind, self.noise_level
            ).to(self.device)
        return self._schedules[seq_len]

    @property
    def sched(self) -> FlowMatchSDE:
        """The schedule at the configured resolution (the learner reads which steps are stochastic)."""
        _, h, w = self.latent_shape(self.resolution)
        return self.schedule(h, w)

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

    def velocity(
        self,
        latents: torch.Tensor,
        index: torch.Tensor,
        text_embeds: torch.Tensor,
        pooled_embeds: torch.Tensor,
        image_latents: torch.Tensor,
    ) -> torch.Tensor:
        """The transformer's velocity for B latents, each at its own step.

        Args:
            latents: (B, C, h, w) x_sigma.
            index: (B,) long step positions in the schedule.
            text_embeds: (B, L, D) T5 embeddings; pooled_embeds: (B, P) CLIP pooled embeddings.
            image_latents: (B, C, h, w) normalised source latents.

        Returns:
            (B, C, h, w) v.
        """
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

    # ------------------------------------------------------------------ rollouts

    @torch.no_grad()
    def rollout(
        self,
        sources: torch.Tensor,
        instructions: list[str],
        nb_gen: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        shared_noise: bool = False,
        exemplars: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        progress: bool = False,
        policy_version: int = 0,
    ) -> Rollout:
        """Sample `nb_gen` edits of each of M inputs and record the trajectories.

        The arguments are `EditPolicy.rollout`'s, and the noise is drawn in the same order (x_T, then
        one draw per step, stochastic or not), so epoch plans and paired evaluation work unchanged.
        """
        if exemplars is not None:
            raise ValueError("FLUX.1 Kontext has no exemplar conditioning")
        m = sources.shape[0]
        if len(instructions) != m:
            raise ValueError(f"{m} sources but {len(instructions)} instructions")
        n = m * nb_gen
        rep = lambda x: x.repeat_interleave(nb_gen, dim=0)  # noqa: E731
        text, pooled = (rep(e) for e in self.encode_text(instructions))
        image_latents = rep(self.encode_images(sources))
        shape = tuple(image_latents.shape)
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"{len(generator)} generators for {n} edits")
        first = generator[::nb_gen] if shared_noise and isinstance(generator, list) else generator
        base = randn((m if shared_noise else n, *shape[1:]), first)
        x = (rep(base) if shared_noise else base).to(self.device, torch.float32)
        sched = self.schedule(*shape[2:])
        traj, log_probs = [x], []
        for i in tqdm(range(self.num_steps), desc="sampling", leave=False, disable=not progress):
            index = torch.full((n,), i, dtype=torch.long, device=self.device)
            v = self.velocity(x, index, text, pooled, image_latents)
            out = sched.step(v, index, x, noise=randn(shape, generator).to(self.device))
            x = out.prev_sample
            traj.append(x)
            log_probs.append(out.log_prob)
        return Rollout(
            latents=torch.stack(traj, dim=1),
            step_index=torch.arange(self.num_steps, device=self.device).expand(n, -1).clone(),
            log_probs=torch.stack(log_probs, dim=1),
            stochastic=sched.step_is_stochastic(),
            text_embeds=text,
            image_latents=image_latents,
            images=self.decode(x),
            sources=rep(sources.float()).to(self.device),
            group=torch.arange(m).repeat_interleave(nb_gen),
            instructions=[s for s in instructions for _ in range(nb_gen)],
            masks=rep(masks) if masks is not None else None,
            policy_version=policy_version,
            pooled_embeds=pooled,
        )

    def step_log_prob(self, batch: Rollout, j: torch.Tensor | int) -> torch.Tensor:
        """(B,) log-probs under the current weights of recorded step `j` (an int or (B,) long), with grad."""
        b = len(batch)
        j = (
            torch.as_tensor(j, device=batch.latents.device).expand(b)
            if not torch.is_tensor(j) or j.ndim == 0
            else j
        )
        rows = torch.arange(b, device=batch.latents.device)
        x, x_next = batch.latents[rows, j].to(self.device), batch.latents[rows, j + 1].to(self.device)
        index = batch.step_index[rows, j].to(self.device)
        v = self.velocity(x, index, batch.text_embeds, batch.pooled_embeds, batch.image_latents)
        return self.schedule(*x.shape[2:]).step(v, index, x, prev_sample=x_next).log_prob

    def forward_x0(self, batch: Rollout, index: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noise each final latent to step `index`'s level on the forward process and predict it back.

        x_sigma = (1 - sigma) x0 + sigma eps, x0_hat = x_sigma - sigma v (rectified flow), with grad.
        Shapes: index (B,), noise (B, C, h, w) -> (B, C, h, w).
        """
        x0 = batch.latents[:, -1].to(self.device)
        sigma = self.schedule(*x0.shape[2:]).sigmas[index].view(-1, 1, 1, 1)
        x = (1 - sigma) * x0 + sigma * noise.to(self.device)
        v = self.velocity(x, index, batch.text_embeds, batch.pooled_embeds, batch.image_latents)
        return x - sigma * v

    @contextlib.contextmanager
    def eval_mode(self):
        """Put the transformer in eval mode for sampling and restore its mode afterwards."""
        was = self.denoiser.training
        self.denoiser.eval()
        try:
            yield
        finally:
            self.denoiser.train(was)
