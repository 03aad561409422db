"""What the flow-matching editors (FLUX.1 Kontext, Qwen-Image-Edit) share: the SDE sampling loop
with per-step log-probs, rescoring a recorded step, the forward-process x0 prediction, the schedule
per latent size, and the contract's small parts. A family supplies its encoders (`encode`), its
velocity (`velocity`), its decoder, and which `Rollout` fields carry its conditioning (`COND_FIELDS`).
"""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from sampler.editors.flow_sde import FlowMatchSDE
from sampler.policy import randn
from sampler.rollout import Rollout
from sampler.schedulers import StepOutput


class FlowEditPolicy:
    """The shared half of a flow-matching edit policy (see `sampler.editors` for the contract).

    Subclasses set `self.c` (the loaded pipeline), `self.device`, `self.num_steps`,
    `self.noise_level`, `self.sde_kind`, `self.resolution`, `self.vae_factor` and call
    `_init_caches()`, and implement `encode`, `velocity`, `decode` and `latent_shape`.
    """

    denoiser_name = "transformer"
    exemplar = None  # no exemplar conditioning on the flow families
    COND_FIELDS: tuple[str, ...] = ("text_embeds", "image_latents")  # the Rollout fields `velocity` reads
    # With sde_kind "cps": Flow-GRPO's log-prob or the exact Gaussian one (`sample.cps_log_prob`).
    cps_log_prob: str = "flow_grpo"

    def _init_caches(self) -> None:
        self._schedules: dict[int, FlowMatchSDE] = {}

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
        raise NotImplementedError

    def schedule(self, h: int, w: int) -> FlowMatchSDE:
        """The step schedule for (h, w) latents (the resolution shift depends on the 2 x 2 tokens)."""
        seq_len = (h // 2) * (w // 2)
        if seq_len not in self._schedules:
            self._schedules[seq_len] = FlowMatchSDE(
                self.c.scheduler,
                self.num_steps,
                seq_len,
                self.sde_kind,
                self.noise_level,
                cps_log_prob=self.cps_log_prob,
            ).to(self.device)
        return self._schedules[seq_len]

    @property
    def sched(self) -> FlowMatchSDE:
        """The schedule at the configured resolution (the learner reads which steps are stochastic)."""
        _, h, w = self.latent_shape(self.resolution)
        return self.schedule(h, w)

    @contextlib.contextmanager
    def eval_mode(self):
        """Put the transformer in eval mode for sampling and restore its mode afterwards."""
        was = self.denoiser.training
        self.denoiser.eval()
        try:
            yield
        finally:
            self.denoiser.train(was)

    # ------------------------------------------------------------------ the family's parts

    def encode(self, sources: torch.Tensor, instructions: list[str]) -> dict[str, torch.Tensor]:
        """M inputs -> the conditioning as `Rollout` fields, one row per input (COND_FIELDS and any
        other per-item field the family records, e.g. `pooled_embeds`)."""
        raise NotImplementedError

    def velocity(self, latents: torch.Tensor, index: torch.Tensor, cond) -> torch.Tensor:
        """(B, C, h, w) x_sigma, (B,) step positions, conditioning with `COND_FIELDS` attributes or
        keys -> (B, C, h, w) velocity (with grad when enabled)."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) final latents -> (N, 3, H, W) images in [0, 1]."""
        raise NotImplementedError

    def _cond(self, batch) -> dict[str, torch.Tensor]:
        return {k: getattr(batch, k) for k in self.COND_FIELDS}

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
            raise ValueError(f"{type(self).__name__}: this family has no exemplar conditioning")
        m = sources.shape[0]
        if len(instructions) != m:
            raise ValueError(f"{m} sources but {len(instructions)} instructions")
        n = m * nb_gen
        rep = lambda x: x.repeat_interleave(nb_gen, dim=0)  # noqa: E731
        cond = {k: rep(v) for k, v in self.encode(sources, instructions).items()}
        c, h, w = self.latent_shape_of(sources)
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(f"{len(generator)} generators for {n} edits")
        first = generator[::nb_gen] if shared_noise and isinstance(generator, list) else generator
        base = randn((m if shared_noise else n, c, h, w), first)
        x = (rep(base) if shared_noise else base).to(self.device, torch.float32)
        sched = self.schedule(h, w)
        traj, log_probs = [x], []
        for i in tqdm(range(self.num_steps), desc="sampling", leave=False, disable=not progress):
            index = torch.full((n,), i, dtype=torch.long, device=self.device)
            v = self.velocity(x, index, cond)
            out = sched.step(v, index, x, noise=randn((n, c, h, w), generator).to(self.device))
            x = out.prev_sample
            traj.append(x)
            log_probs.append(out.log_prob)
        return Rollout(
            latents=torch.stack(traj, dim=1),
            step_index=torch.arange(self.num_steps, device=self.device).expand(n, -1).clone(),
            log_probs=torch.stack(log_probs, dim=1),
            stochastic=sched.step_is_stochastic(),
            images=self.decode(x),
            sources=rep(sources.float()).to(self.device),
            group=torch.arange(m).repeat_interleave(nb_gen),
            instructions=[s for s in instructions for _ in range(nb_gen)],
            masks=rep(masks) if masks is not None else None,
            policy_version=policy_version,
            **cond,
        )

    def latent_shape_of(self, sources: torch.Tensor) -> tuple[int, int, int]:
        """(C, h, w) of the edits' latents for (M, 3, H, W) sources (edits keep the source size)."""
        side_h, side_w = sources.shape[-2] // self.vae_factor, sources.shape[-1] // self.vae_factor
        return (self.latent_shape(self.resolution)[0], side_h, side_w)

    def step_log_prob(self, batch: Rollout, j: torch.Tensor | int) -> torch.Tensor:
        """(B,) log-probs under the current weights of recorded step `j` (an int or (B,) long), with grad."""
        return self.step_output(batch, j).log_prob

    def step_output(self, batch: Rollout, j: torch.Tensor | int) -> StepOutput:
        """Recorded step `j` (an int or (B,) long) rescored under the current weights, with grad: its
        log-prob (B,), mean (B, C, h, w) and the stds (Flow-GRPO's KL reads the mean and `kl_std`)."""
        b = len(batch)
        j = (
            torch.as_tensor(j, device=batch.latents.device).expand(b)
            if not torch.is_tensor(j) or j.ndim == 0
            else j
        )
        rows = torch.arange(b, device=batch.latents.device)
        x, x_next = batch.latents[rows, j].to(self.device), batch.latents[rows, j + 1].to(self.device)
        index = batch.step_index[rows, j].to(self.device)
        v = self.velocity(x, index, self._cond(batch))
        return self.schedule(*x.shape[2:]).step(v, index, x, prev_sample=x_next)

    def forward_x0(
        self, batch: Rollout, index: torch.Tensor, noise: torch.Tensor, with_output: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Noise each final latent to step `index`'s level on the forward process and predict it back.

        x_sigma = (1 - sigma) x0 + sigma eps, x0_hat = x_sigma - sigma v (rectified flow), with grad.
        Shapes: index (B,), noise (B, C, h, w) -> (B, C, h, w); with `with_output`, (x0_hat, v).
        """
        x0 = batch.latents[:, -1].to(self.device)
        sigma = self.schedule(*x0.shape[2:]).sigmas[index].view(-1, 1, 1, 1)
        x = (1 - sigma) * x0 + sigma * noise.to(self.device)
        v = self.velocity(x, index, self._cond(batch))
        return (x - sigma * v, v) if with_output else x - sigma * v
