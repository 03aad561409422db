"""Flow-matching sampling steps with log-probabilities: Flow-GRPO's SDE, CPS, and the ODE.

A rectified-flow model predicts the velocity v = eps - x0 of x_sigma = (1 - sigma) x0 + sigma eps;
the sampler walks the schedule sigma_0 = 1 > ... > sigma_T = 0 of diffusers'
`FlowMatchEulerDiscreteScheduler` (its `set_timesteps`, with the pipeline's resolution shift `mu`).
Each step draws x_next ~ N(mean, std^2 I):

- "sde" (Flow-GRPO, Liu et al. 2025, arXiv 2505.05470, eq. 9; `yifan123/flow_grpo`
  `flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`, `sde_step_with_logprob`, sde_type "sde"): with
  dt = sigma_next - sigma < 0 and s = a sqrt(sigma / (1 - sigma)) (a = the noise level; sigma = 1 is
  replaced by sigma_1 in the denominator, as upstream does),
      mean = x (1 + s^2 dt / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) dt,   std = s sqrt(-dt).
- "cps" (coefficients-preserving sampling, Wang et al. 2025, arXiv 2509.05952, eq. 8; upstream
  sde_type "cps"): with x0_hat = x - sigma v, x1_hat = x + (1 - sigma) v and std = sigma_next
  sin(a pi / 2),
      mean = (1 - sigma_next) x0_hat + sqrt(sigma_next^2 - std^2) x1_hat,
  so x_next has exactly the noise level sigma_next (the SDE above over-injects noise at few steps).
- noise level 0 (either kind) is the Euler ODE x_next = x + v dt, diffusers' own step: use it to
  evaluate.

Log-probabilities. "sde" takes the Gaussian log-density averaged over latent dimensions, as
upstream. "cps" follows upstream by default (`cps_log_prob="flow_grpo"`; `flow_grpo/diffusers_patch/
sd3_sde_with_logprob.py`, lines 85-86 at commit 54809b5): log_prob = -mean((x_next - mean)^2), the
density without its 1 / (2 std^2) factor. That is not a rescaling of the whole ratio: the factor
changes from step to step (0.65 to 149 for Kontext at 28 steps, noise 0.7), so the exact density
(`cps_log_prob="gaussian"`) weighs the late, low-noise steps far more in the ratio and in clipping.

What changed from upstream: stateless functions of a per-item step index (a training batch mixes
steps) and the sample taken is passed in to score a recorded step.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from sampler.schedulers import StepOutput, gaussian_log_prob, squared_error_log_prob

SDE_KINDS = ("sde", "cps")
CPS_LOG_PROBS = ("flow_grpo", "gaussian")


def calculate_shift(seq_len: int, config) -> float:
    """The resolution shift mu of FLUX pipelines (`pipeline_flux_kontext.calculate_shift`), linear in the
    number of image tokens between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift)."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * m + base_shift - m * base_len


class FlowMatchSDE:
    """The sigma schedule of a diffusers flow-matching scheduler with stateless log-prob steps.

    Args:
        scheduler: a diffusers `FlowMatchEulerDiscreteScheduler` (copied; its config is read).
        num_steps: denoising steps T.
        seq_len: image tokens of the latents (the resolution shift `mu` depends on it).
        kind: "sde" or "cps".
        noise_level: a in the formulas above; 0 gives the ODE.
        sigmas: custom sigmas (T,) as a pipeline takes them; default linspace(1, 1 / T, T) as FLUX does.
        cps_log_prob: with kind "cps", "flow_grpo" (upstream's -mean((x - mean)^2)) or "gaussian"
            (the exact log-density); ignored by "sde".
    """

    def __init__(
        self,
        scheduler,
        num_steps: int,
        seq_len: int,
        kind: str = "sde",
        noise_level: float = 0.7,
        sigmas: np.ndarray | None = None,
        cps_log_prob: str = "flow_grpo",
    ) -> None:
        if kind not in SDE_KINDS:
            raise ValueError(f"unknown flow sampler kind {kind!r} (expected one of {SDE_KINDS})")
        if cps_log_prob not in CPS_LOG_PROBS:
            raise ValueError(f"unknown CPS log-prob {cps_log_prob!r} (expected one of {CPS_LOG_PROBS})")
        self.kind = kind
        self.cps_log_prob = cps_log_prob
        self.noise_level = float(noise_level)
        self.num_steps = num_steps
        sched = copy.deepcopy(scheduler)
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps) if sigmas is None else sigmas
        mu = calculate_shift(seq_len, sched.config) if sched.config.get("use_dynamic_shifting") else None
        sched.set_timesteps(sigmas=sigmas, mu=mu)
        self.timesteps = sched.timesteps.clone().float()  # (T,) sigma * 1000, the model's time input
        self.sigmas = sched.sigmas.clone().float()  # (T + 1,), the last is 0
        self.init_noise_sigma = 1.0

    def to(self, device: torch.device | str) -> FlowMatchSDE:
        self.timesteps, self.sigmas = self.timesteps.to(device), self.sigmas.to(device)
        return self

    @staticmethod
    def _bcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def _std(self, index: torch.Tensor) -> torch.Tensor:
        """(B,) standard deviation of step `index`'s Gaussian."""
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        if self.kind == "cps":
            return sigma_next * math.sin(self.noise_level * math.pi / 2)
        sigma_max = self.sigmas[1]
        s = (sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))).sqrt() * self.noise_level
        return s * (sigma - sigma_next).sqrt()

    def kl_std(self, index: torch.Tensor) -> torch.Tensor:
        """(B,) the `std_dev_t` Flow-GRPO's step returns and its KL divides by: "cps" the step's std,
        "sde" s = a sqrt(sigma / (1 - sigma)) without the sqrt(-dt) of the step's std
        (`flow_grpo/diffusers_patch/sd3_sde_with_logprob.py` at 54809b5, lines 50 and 71)."""
        if self.kind == "cps":
            return self._std(index).expand(index.shape)
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        return self._std(index) / (sigma - sigma_next).sqrt()

    def step_is_stochastic(self) -> torch.Tensor:
        """(T,) bool: which steps inject noise (and so have a log-probability)."""
        return self._std(torch.arange(self.num_steps, device=self.sigmas.device)) > 0

    def step(
        self,
        model_output: torch.Tensor,
        index: torch.Tensor,
        sample: torch.Tensor,
        noise: torch.Tensor | None = None,
        prev_sample: torch.Tensor | None = None,
    ) -> StepOutput:
        """One step x_sigma -> x_sigma_next.

        Args:
            model_output: (B, ...) predicted velocity v.
            index: (B,) long, each item's position in `self.sigmas`.
            sample: (B, ...) current latents.
            noise: (B, ...) standard normal noise (zeros if None).
            prev_sample: (B, ...) a recorded next latent to score instead of drawing one.
        """
        v, x = model_output.float(), sample.float()
        sigma = self._bcast(self.sigmas[index], x)
        sigma_next = self._bcast(self.sigmas[index + 1], x)
        dt = sigma_next - sigma
        std = self._bcast(self._std(index), x)
        if self.noise_level == 0:
            mean = x + dt * v  # the Euler ODE step, as FlowMatchEulerDiscreteScheduler.step
        elif self.kind == "sde":
            s2 = (std / (-dt).sqrt()) ** 2  # s^2 of Flow-GRPO eq. 9
            mean = x * (1 + s2 / (2 * sigma) * dt) + v * (1 + s2 * (1 - sigma) / (2 * sigma)) * dt
        else:
            x0_hat, x1_hat = x - sigma * v, x + (1 - sigma) * v
            mean = (1 - sigma_next) * x0_hat + (sigma_next**2 - std**2).clamp(min=0).sqrt() * x1_hat
        if prev_sample is None:
            prev_sample = mean if noise is None else mean + std * noise.to(mean)
        density = gaussian_log_prob
        if self.kind == "cps" and self.cps_log_prob == "flow_grpo":
            density = squared_error_log_prob
        kl_std = self._bcast(self.kl_std(index), x)
        return StepOutput(prev_sample.float(), density(prev_sample.float(), mean, std), mean, std, kl_std)
