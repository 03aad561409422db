"""InstructPix2Pix sampling with per-step log-probabilities.

The guidance follows diffusers' `StableDiffusionInstructPix2PixPipeline.__call__` (v0.30+): the UNet
sees three copies of the latents, conditioned on (instruction, source), (empty prompt, source) and
(empty prompt, no source), and

    eps = eps_uncond + s_img (eps_img - eps_uncond) + s_txt (eps_txt - eps_img).

With SPIE's exemplar conditioning a fourth copy carries (empty prompt, source, exemplar) and the
text branch also sees the exemplar (SPIE `architecture.single_noise_pred`):

    eps = eps_uncond + s_img (eps_img - eps_uncond) + s_ex (eps_ex - eps_img) + s_txt (eps_txt - eps_ex).

What changed from diffusers: the loop records latents and log-probs (`sampler.schedulers`), each item
may sit at its own timestep (so training can recompute any recorded step), and `nb_gen` edits per
input share or do not share their initial noise.
"""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from sampler.exemplar import ExemplarPreconv
from sampler.models import Components
from sampler.rollout import Rollout
from sampler.schedulers import LogProbScheduler


class EditPolicy:
    """An InstructPix2Pix model that samples edits and scores its own recorded steps.

    Args:
        components: loaded model parts (`sampler.models.load_components`).
        scheduler: "ddim" or "euler_ancestral".
        num_steps: denoising steps T.
        eta: DDIM noise scale.
        guidance_scale, image_guidance_scale, exemplar_guidance_scale: CFG scales.
        exemplar: the pre-conv module when exemplar conditioning is on (the UNet then takes 12 channels).
        device: where the models run.
    """

    def __init__(
        self,
        components: Components,
        scheduler: str = "ddim",
        num_steps: int = 20,
        eta: float = 1.0,
        guidance_scale: float = 7.5,
        image_guidance_scale: float = 1.5,
        exemplar_guidance_scale: float = 3.0,
        exemplar: ExemplarPreconv | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        self.c = components
        self.device = torch.device(device)
        self.kind = scheduler
        self.sched = LogProbScheduler(components.scheduler, scheduler, num_steps, eta).to(self.device)
        self.guidance_scale = guidance_scale
        self.image_guidance_scale = image_guidance_scale
        self.exemplar_guidance_scale = exemplar_guidance_scale
        self.exemplar = exemplar
        self.scaling_factor = float(components.vae.config.scaling_factor)
        for module in (components.unet, components.vae, components.text_encoder, exemplar):
            if module is not None:
                module.to(self.device)
        self._null: torch.Tensor | None = None

    denoiser_name = "unet"

    @property
    def denoiser(self) -> torch.nn.Module:
        """The trained network (the UNet); settable, so a learner can swap in a frozen reference."""
        return self.c.unet

    @denoiser.setter
    def denoiser(self, module: torch.nn.Module) -> None:
        self.c.unet = module

    unet = denoiser

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents for resolution x resolution images."""
        vae = self.c.vae.config
        side = resolution // 2 ** (len(vae.block_out_channels) - 1)
        return (int(vae.latent_channels), side, side)

    # ------------------------------------------------------------------ encoders

    @torch.no_grad()
    def encode_text(self, instructions: list[str]) -> torch.Tensor:
        """N instructions -> (N, L, D) CLIP last hidden states, as the pipeline's `_encode_prompt`."""
        tok = self.c.tokenizer
        ids = tok(
            list(instructions),
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.c.text_encoder(ids)[0]

    def null_embeds(self, n: int) -> torch.Tensor:
        """(n, L, D) embeddings of the empty prompt (cached)."""
        if self._null is None:
            self._null = self.encode_text([""])
        return self._null.expand(n, -1, -1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, 4, H/f, W/f) VAE latent means (unscaled, as InstructPix2Pix)."""
        vae = self.c.vae
        x = images.to(self.device, vae.dtype) * 2 - 1
        return vae.encode(x).latent_dist.mode()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, 4, h, w) denoised latents -> (N, 3, H, W) images in [0, 1]."""
        vae = self.c.vae
        images = vae.decode(latents.to(vae.dtype) / self.scaling_factor).sample
        return (images / 2 + 0.5).clamp(0, 1).float()

    # ------------------------------------------------------------------ one guided prediction

    def guided_noise(
        self,
        latents: torch.Tensor,
        index: torch.Tensor,
        text_embeds: torch.Tensor,
        image_latents: torch.Tensor,
        exemplar_latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Guided noise prediction for B latents, each at its own step.

        Args:
            latents: (B, 4, h, w) x_t.
            index: (B,) long step indices into the scheduler's timesteps.
            text_embeds: (B, L, D) instruction embeddings.
            image_latents: (B, 4, h, w) source latents.
            exemplar_latents: (B, 4, h, w) or None.

        Returns:
            (B, 4, h, w) eps.
        """
        b = latents.shape[0]
        null = self.null_embeds(b).to(text_embeds.dtype)
        scaled = self.sched.scale_input(latents, index)
        t = self.sched.timesteps[index]
        zeros = torch.zeros_like(image_latents)
        if self.exemplar is None:
            copies = 3
            model_in = torch.cat(
                [scaled.repeat(3, 1, 1, 1), torch.cat([image_latents, image_latents, zeros])], dim=1
            )
            embeds = torch.cat([text_embeds, null, null])
        else:
            copies = 4
            if exemplar_latents is None:
                raise ValueError("exemplar conditioning is on but no exemplar latents were given")
            extra = self.exemplar(exemplar_latents, latents, text_embeds)
            model_in = torch.cat(
                [
                    scaled.repeat(4, 1, 1, 1),
                    torch.cat([image_latents, image_latents, zeros, image_latents]),
                    torch.cat([extra, torch.zeros_like(extra), torch.zeros_like(extra), extra]),
                ],
                dim=1,
            )
            embeds = torch.cat([text_embeds, null, null, null])
        unet = self.c.unet
        out = unet(
            model_in.to(unet.dtype), t.repeat(copies), encoder_hidden_states=embeds.to(unet.dtype)
        ).sample
        out = out.float()
        if self.exemplar is None:
            e_txt, e_img, e_unc = out.chunk(3)
            return e_unc + self.image_guidance_scale * (e_img - e_unc) + self.guidance_scale * (e_txt - e_img)
        e_txt, e_img, e_unc, e_ex = out.chunk(4)
        return (
            e_unc
            + self.image_guidance_scale * (e_img - e_unc)
            + self.exemplar_guidance_scale * (e_ex - e_img)
            + self.guidance_scale * (e_txt - e_ex)
        )

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

        Args:
            sources: (M, 3, H, W) in [0, 1].
            instructions: M instructions.
            nb_gen: edits per input; the result holds N = M * nb_gen items, input-major.
            generator: CPU generator for all noise (initial latents and per-step noise), or a list of
                N generators, one per item (as diffusers' `randn_tensor` takes them): item i's noise
                then comes from generator i alone, so its edit does not depend on the batch it is
                in (paired evaluation samples two models this way).
            shared_noise: the nb_gen edits of one input start from the same x_T (with a list, the
                generator of the input's first edit draws it).
            exemplars: (M, 3, H, W) exemplar images in [0, 1] (exemplar conditioning only).
            masks: (M, H, W) bool edit masks, carried along for the scorers.
            progress: show a progress bar over the denoising steps.
        """
        m = sources.shape[0]
        if len(instructions) != m:
            raise ValueError(f"{m} sources but {len(instructions)} instructions")
        n = m * nb_gen
        rep = lambda x: x.repeat_interleave(nb_gen, dim=0)  # noqa: E731
        text = rep(self.encode_text(instructions))
        image_latents = rep(self.encode_images(sources))
        ex_latents = rep(self.encode_images(exemplars)) if exemplars is not None else None
        shape = (n, image_latents.shape[1], *image_latents.shape[2:])
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"{len(generator)} generators for {n} edits")
        first = generator[::nb_gen] if shared_noise and isinstance(generator, list) else generator
        base = randn((m if shared_noise else n, *shape[1:]), first)
        x = ((rep(base) if shared_noise else base) * self.sched.init_noise_sigma).to(
            self.device, torch.float32
        )
        steps = self.sched.num_steps
        traj, log_probs = [x], []
        bar = tqdm(range(steps), desc="sampling", leave=False, disable=not progress)
        for i in bar:
            index = torch.full((n,), i, dtype=torch.long, device=self.device)
            eps = self.guided_noise(x, index, text, image_latents, ex_latents)
            noise = randn(shape, generator).to(self.device)
            out = self.sched.step(eps, index, x, noise=noise)
            x = out.prev_sample
            traj.append(x)
            log_probs.append(out.log_prob)
        images = self.decode(x)
        return Rollout(
            latents=torch.stack(traj, dim=1),
            step_index=torch.arange(steps, device=self.device).expand(n, steps).clone(),
            log_probs=torch.stack(log_probs, dim=1),
            stochastic=self.sched.step_is_stochastic(),
            text_embeds=text,
            image_latents=image_latents,
            images=images,
            sources=rep(sources.float()).to(self.device),
            group=torch.arange(m).repeat_interleave(nb_gen),
            instructions=[s for s in instructions for _ in range(nb_gen)],
            exemplar_latents=ex_latents,
            masks=rep(masks) if masks is not None else None,
            policy_version=policy_version,
        )

    def step_log_prob(self, batch: Rollout, j: torch.Tensor | int) -> torch.Tensor:
        """Log-prob under the current weights of recorded step `j` of each trajectory (with grad).

        Args:
            batch: B items.
            j: step position along the trajectory: an int or a (B,) long tensor (one per item).

        Returns:
            (B,) log-probabilities.
        """
        b = len(batch)
        j = (
            torch.as_tensor(j, device=batch.latents.device).expand(b)
            if not torch.is_tensor(j) or j.ndim == 0
            else j
        )
        rows = torch.arange(b, device=batch.latents.device)
        x_t, x_prev = batch.latents[rows, j], batch.latents[rows, j + 1]
        index = batch.step_index[rows, j].to(self.device)
        eps = self.guided_noise(
            x_t.to(self.device), index, batch.text_embeds, batch.image_latents, batch.exemplar_latents
        )
        return self.sched.step(eps, index, x_t.to(self.device), prev_sample=x_prev.to(self.device)).log_prob

    def forward_x0(
        self, batch: Rollout, index: torch.Tensor, noise: torch.Tensor, with_output: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Noise each final latent to step `index`'s level on the forward process and predict it back.

        DDIM: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, x0_hat = (x_t - sqrt(1 - a_t) eps_hat) / sqrt(a_t);
        Euler-ancestral: x = x0 + sigma eps, x0_hat = x - sigma eps_hat. With the policy's guidance (at
        scales 1 the (instruction, source) branch alone, the CFG-free model DiffusionNFT trains).
        Shapes: index (B,), noise (B, 4, h, w) -> (B, 4, h, w), with grad; with `with_output`,
        (x0_hat, eps_hat).
        """
        x0 = batch.latents[:, -1].to(self.device)
        noise = noise.to(self.device)
        if self.kind == "ddim":
            a = self.sched.alpha_t[index].view(-1, 1, 1, 1)
            x = a.sqrt() * x0 + (1 - a).sqrt() * noise
        else:
            sigma = self.sched.sigmas[index].view(-1, 1, 1, 1)
            x = x0 + sigma * noise
        eps = self.guided_noise(x, index, batch.text_embeds, batch.image_latents, batch.exemplar_latents)
        x0_hat = (x - (1 - a).sqrt() * eps) / a.sqrt() if self.kind == "ddim" else x - sigma * eps
        return (x0_hat, eps) if with_output else x0_hat

    @contextlib.contextmanager
    def eval_mode(self):
        """Put the UNet in eval mode for sampling and restore its mode afterwards."""
        was = self.c.unet.training
        self.c.unet.eval()
        try:
            yield
        finally:
            self.c.unet.train(was)


def randn(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """(B, ...) standard normal on the CPU from one generator, or row b from `generator[b]` of B."""
    if isinstance(generator, list):
        return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in generator])
    return torch.randn(shape, generator=generator)
