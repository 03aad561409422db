"""Scheduler steps that also return the log-probability of the step taken.

Adapted from diffusers' `DDIMScheduler.step` and `EulerAncestralDiscreteScheduler.step`
(diffusers v0.30+, src/diffusers/schedulers/) and from ddpo-pytorch's `ddim_with_logprob.py` and
SPIE's `eulerancestral_withlogprob.py`. What changed: the steps are stateless functions of a
per-item step *index* (so a training batch may mix timesteps), they take the sample actually taken
(`prev_sample`) to score recorded trajectories, and they return the Gaussian's mean and std.

Both samplers draw x_{t-1} ~ N(mean(x_t, eps), std^2 I). The log-probability is the Gaussian
log-density averaged over the latent dimensions (as DDPO does), so it is comparable across image
sizes. Steps with std = 0 (eta = 0, or Euler-ancestral's last step) are deterministic: their
log-prob is reported as 0 and `trainable` marks them False.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class StepOutput:
    """One denoising step for a batch of B latents (C, h, w).

    Attributes:
        prev_sample: (B, C, h, w) the next latents x_{t-1}.
        log_prob: (B,) mean per-dimension log N(prev_sample; mean, std^2).
        mean: (B, C, h, w) the Gaussian's mean.
        std: (B, 1, 1, 1) its standard deviation.
        kl_std: (B, 1, 1, 1) the std Flow-GRPO's KL divides by (`FlowMatchSDE.kl_std`; flow steps only).
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    kl_std: torch.Tensor | None = None


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Mean over non-batch dims of log N(x; mean, std^2); 0 where std == 0.  Shapes: (B, ...) -> (B,)."""
    safe = torch.where(std > 0, std, torch.ones_like(std))
    lp = -((x.detach() - mean) ** 2) / (2 * safe**2) - torch.log(safe) - 0.5 * math.log(2 * math.pi)
    lp = torch.where(std > 0, lp, torch.zeros_like(lp))
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def squared_error_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's CPS log-prob: -mean over non-batch dims of (x - mean)^2, the Gaussian log-density
    without its 1 / (2 std^2) factor and constants; 0 where std == 0.  Shapes: (B, ...) -> (B,).

    `yifan123/flow_grpo` `flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`, lines 85-86 at commit
    54809b5 (sde_type "cps": "remove all constants").
    """
    lp = -((x.detach() - mean) ** 2)
    lp = torch.where(std > 0, lp, torch.zeros_like(lp))
    return lp.mean(dim=tuple(range(1, lp.ndim)))


class LogProbScheduler:
    """The schedule of a diffusers DDIM or Euler-ancestral scheduler, with stateless log-prob steps.

    Args:
        scheduler: a diffusers `DDIMScheduler` or `EulerAncestralDiscreteScheduler` (its config is read;
            `set_timesteps` is called on it once here).
        kind: "ddim" or "euler_ancestral".
        num_steps: number of inference steps T.
        eta: DDIM's noise scale (ignored by Euler-ancestral, whose noise is fixed by the sigmas).
    """

    def __init__(self, scheduler, kind: str, num_steps: int, eta: float = 1.0) -> None:
        if kind not in ("ddim", "euler_ancestral"):
            raise ValueError(f"unknown scheduler kind {kind!r}")
        self.kind = kind
        self.scheduler = scheduler
        self.num_steps = num_steps
        self.eta = float(eta)
        scheduler.set_timesteps(num_steps)
        self.timesteps = scheduler.timesteps.clone()  # (T,)
        self.init_noise_sigma = float(scheduler.init_noise_sigma)
        config = scheduler.config
        self.prediction_type = config.prediction_type
        if self.prediction_type != "epsilon":
            raise ValueError(f"only epsilon prediction is supported, got {self.prediction_type!r}")
        if kind == "ddim":
            alphas = scheduler.alphas_cumprod.to(torch.float64)
            ratio = config.num_train_timesteps // num_steps
            prev = self.timesteps.long() - ratio
            final = float(scheduler.final_alpha_cumprod)
            self.alpha_t = alphas[self.timesteps.long()].float()  # (T,)
            self.alpha_prev = torch.where(
                prev >= 0, alphas[prev.clamp(min=0)], torch.tensor(final, dtype=torch.float64)
            ).float()
            self.clip_sample = bool(config.clip_sample)
            self.clip_range = float(getattr(config, "clip_sample_range", 1.0))
            if getattr(config, "thresholding", False):
                raise ValueError("DDIM dynamic thresholding is not supported by the log-prob sampler")
        else:
            self.sigmas = scheduler.sigmas.clone().float()  # (T + 1,)

    def to(self, device: torch.device | str) -> LogProbScheduler:
        for name in ("timesteps", "alpha_t", "alpha_prev", "sigmas"):
            if hasattr(self, name):
                setattr(self, name, getattr(self, name).to(device))
        return self

    @staticmethod
    def _bcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def scale_input(self, sample: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The UNet's input for latents `sample` (B, C, h, w) at step indices `index` (B,)."""
        if self.kind == "ddim":
            return sample
        sigma = self._bcast(self.sigmas[index], sample)
        return sample / (sigma**2 + 1) ** 0.5

    def step_is_stochastic(self) -> torch.Tensor:
        """(T,) bool: which steps inject noise (and so have a log-probability)."""
        index = torch.arange(self.num_steps, device=self.timesteps.device)
        return (self._std(index) > 0).view(-1)

    def _std(self, index: torch.Tensor) -> torch.Tensor:
        if self.kind == "ddim":
            a_t, a_prev = self.alpha_t[index], self.alpha_prev[index]
            variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
            return self.eta * variance.clamp(min=0).sqrt()
        s_from, s_to = self.sigmas[index], self.sigmas[index + 1]
        return (s_to**2 * (s_from**2 - s_to**2) / s_from**2).clamp(min=0).sqrt()

    def pred_x0(self, model_output: torch.Tensor, index: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The clean latents the step predicts from x_t: (B, C, h, w) eps, (B,) index, (B, C, h, w) x_t.

        DDIM: x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) (Song et al. 2021, eq. 12), clipped as `step`
        clips it; Euler-ancestral: x0 = x - sigma eps.
        """
        if self.kind == "ddim":
            a_t = self._bcast(self.alpha_t[index], sample)
            x0 = (sample - (1 - a_t) ** 0.5 * model_output) / a_t**0.5
            return x0.clamp(-self.clip_range, self.clip_range) if self.clip_sample else x0
        return sample - self._bcast(self.sigmas[index], sample) * model_output

    def jump(
        self, model_output: torch.Tensor, index: torch.Tensor, sample: torch.Tensor, to_index: int
    ) -> torch.Tensor:
        """A deterministic move from x at step indices `index` (B,) to the timestep at position
        `to_index` (> index; `num_steps` is the clean end), along the same noise prediction.

        DDIM: x_s = sqrt(a_s) x0 + sqrt(1 - a_s) eps, the eta-0 update of Song et al. 2021, eq. 12,
        over several steps at once; Euler: x_s = x0 + sigma_s eps. At `num_steps` it is `pred_x0`.
        """
        x0 = self.pred_x0(model_output, index, sample)
        if to_index >= self.num_steps:
            return x0
        if self.kind == "ddim":
            a_s = self.alpha_t[to_index].to(sample.dtype)
            return a_s**0.5 * x0 + (1 - a_s) ** 0.5 * model_output
        return x0 + self.sigmas[to_index].to(sample.dtype) * model_output

    def step(
        self,
        model_output: torch.Tensor,
        index: torch.Tensor,
        sample: torch.Tensor,
        noise: torch.Tensor | None = None,
        prev_sample: torch.Tensor | None = None,
    ) -> StepOutput:
        """One step x_t -> x_{t-1}.

        Args:
            model_output: (B, C, h, w) guided noise prediction eps.
            index: (B,) long, the position of each item's timestep in `self.timesteps`.
            sample: (B, C, h, w) current latents x_t.
            noise: (B, C, h, w) standard normal noise used to draw x_{t-1} (zeros if None).
            prev_sample: (B, C, h, w) a recorded x_{t-1} to score instead of drawing one.
        """
        std = self._bcast(self._std(index), sample)
        if self.kind == "ddim":
            # DDIM (Song et al. 2021), eq. 12: x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z,
            # with s = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) (eq. 16).
            a_t = self._bcast(self.alpha_t[index], sample)
            a_prev = self._bcast(self.alpha_prev[index], sample)
            pred_x0 = (sample - (1 - a_t) ** 0.5 * model_output) / a_t**0.5
            if self.clip_sample:
                pred_x0 = pred_x0.clamp(-self.clip_range, self.clip_range)
            direction = (1 - a_prev - std**2).clamp(min=0) ** 0.5 * model_output
            mean = a_prev**0.5 * pred_x0 + direction
        else:
            # Euler-ancestral (Karras et al. 2022, ancestral sampling): split the move to sigma_to into a
            # deterministic Euler step to sigma_down and fresh noise of scale sigma_up.
            s_from = self._bcast(self.sigmas[index], sample)
            s_to = self._bcast(self.sigmas[index + 1], sample)
            s_down = (s_to**2 - std**2).clamp(min=0) ** 0.5
            derivative = model_output  # (x - x0) / sigma with x0 = x - sigma * eps
            mean = sample + derivative * (s_down - s_from)
        if prev_sample is None:
            prev_sample = mean if noise is None else mean + std * noise
        return StepOutput(prev_sample, gaussian_log_prob(prev_sample, mean, std), mean, std)
