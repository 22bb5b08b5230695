"""One noise scheduler for training (``add_noise``) and sampling (``set_timesteps`` + ``step``).

Modelled on diffusers' ``DDPMScheduler`` / ``DDIMScheduler``: a plain object holding the noise
schedule, with string options typed as ``Literal``. The network never sees the schedule; it
receives ``x_t`` and the integer timestep ``t`` and returns ``model_output``, which this object
interprets according to ``prediction_type``.

Notation (numbered comments below refer to it):
  (1) beta_t            noise variance added at step t                      (Ho et al. 2020, eq. 2)
  (2) alpha_t = 1 - beta_t,  alpha_bar_t = prod_{s<=t} alpha_s                      (Ho, eq. 4)
  (3) x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps                        (Ho, eq. 4)
  (4) v   = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0     (Salimans & Ho 2022, sec. 4)
  (5) DDPM posterior q(x_{t-1} | x_t, x_0) = N(mu_t, beta~_t I)                      (Ho, eq. 7)
        mu_t     = sqrt(alpha_bar_prev) beta_t / (1 - alpha_bar_t) x_0
                   + sqrt(alpha_t) (1 - alpha_bar_prev) / (1 - alpha_bar_t) x_t
        beta~_t  = (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta_t
  (6) DDIM update                                                      (Song et al. 2021, eq. 12)
        x_{t-1} = sqrt(alpha_bar_prev) x0_hat + sqrt(1 - alpha_bar_prev - sigma_t^2) eps_hat
                  + sigma_t z
        sigma_t = eta sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_prev)
      eta = 0 is deterministic DDIM; eta = 1 gives exactly the DDPM posterior (5).
  (7) cosine schedule alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) pi/2)
                                                               (Nichol & Dhariwal 2021, eq. 17)

When sampling with fewer steps than training (strided timesteps), "t-1" means the previous
timestep of the sampling grid, and beta_t in (5) becomes 1 - alpha_bar_t / alpha_bar_prev (as in
diffusers), so DDPM works on any grid too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch

BetaSchedule = Literal["linear", "cosine"]
PredictionType = Literal["epsilon", "sample", "v_prediction"]
SamplerType = Literal["ddim", "ddpm"]

_BETA_SCHEDULES = ("linear", "cosine")
_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
_SAMPLERS = ("ddim", "ddpm")


@dataclass
class SchedulerStepOutput:
    """Result of one reverse step.

    Attributes:
        prev_sample: x_{t-1}, same shape as the input sample.
        pred_original_sample: the model's estimate of x_0 at this step, same shape.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def _cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    # (7) betas from consecutive ratios of alpha_bar, clipped as in the paper.
    def f(t: float) -> float:
        return math.cos((t / num_steps + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


def _broadcast(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[timesteps] reshaped to broadcast against ``like`` (leading dim = batch)."""
    out = values.to(like.device)[timesteps.to(like.device).long()].to(like.dtype)
    while out.dim() < like.dim():
        out = out.unsqueeze(-1)
    return out


class NoiseScheduler:
    """Gaussian diffusion schedule with DDPM and DDIM reverse steps.

    Args:
        num_train_timesteps: T, the number of forward steps used in training.
        beta_schedule: ``"linear"`` (Ho et al.; betas from ``beta_start`` to ``beta_end``) or
            ``"cosine"`` (Nichol & Dhariwal).
        prediction_type: what the network predicts: ``"epsilon"`` (the noise), ``"sample"``
            (x_0) or ``"v_prediction"`` (v, eq. 4).
        beta_start: first beta of the linear schedule (for T = 1000; scaled by 1000 / T).
        beta_end: last beta of the linear schedule (for T = 1000; scaled by 1000 / T).
        clip_sample: clamp the x_0 estimate to ``[-clip_sample_range, clip_sample_range]``.
        clip_sample_range: bound used by ``clip_sample``.

    Example::

        sched = NoiseScheduler(200, "cosine", "v_prediction")
        x_t = sched.add_noise(z0, noise, t)                     # training
        sched.set_timesteps(10, sampler="ddim")
        for t in sched.timesteps:                               # sampling
            x = sched.step(model(x, t), t, x).prev_sample
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: BetaSchedule = "cosine",
        prediction_type: PredictionType = "epsilon",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
    ) -> None:
        if num_train_timesteps < 2:
            raise ValueError(
                f"num_train_timesteps={num_train_timesteps} must be >= 2; set diffusion.num_train_timesteps"
            )
        if beta_schedule not in _BETA_SCHEDULES:
            raise ValueError(f"beta_schedule {beta_schedule!r} not in {list(_BETA_SCHEDULES)}")
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} not in {list(_PREDICTION_TYPES)}")
        if not (0 < beta_start < beta_end < 1):
            raise ValueError(f"need 0 < beta_start ({beta_start}) < beta_end ({beta_end}) < 1")
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_schedule = beta_schedule
        self.prediction_type = prediction_type
        self.clip_sample = clip_sample
        self.clip_sample_range = float(clip_sample_range)

        if beta_schedule == "linear":
            # (1) linearly spaced betas. Ho et al. use 1e-4 .. 0.02 for T = 1000; as in Nichol &
            # Dhariwal's code they are scaled by 1000 / T, so that alpha_bar_{T-1} ~ 0 for any T
            # (unscaled, T = 200 would end at alpha_bar = 0.13: sampling would start off-distribution).
            scale = 1000.0 / num_train_timesteps
            betas = torch.linspace(
                beta_start * scale, min(beta_end * scale, 0.999), num_train_timesteps, dtype=torch.float64
            )
        else:
            betas = _cosine_betas(num_train_timesteps)
        self.betas = betas.float()  # (T,)  (1)
        self.alphas = (1.0 - betas).float()  # (T,)  (2) alpha_t
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).float()  # (T,)  (2) alpha_bar_t
        self.final_alpha_cumprod = torch.tensor(1.0)  # alpha_bar "before" t = 0

        self.num_inference_steps: Optional[int] = None
        self.sampler: SamplerType = "ddim"
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)  # (T,) descending

    # ------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------
    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """(3) x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

        Args:
            original_samples: x_0, shape (N, ...).
            noise: eps, same shape.
            timesteps: (N,) integer timesteps in [0, T).

        Returns:
            x_t, same shape as ``original_samples``.
        """
        self._check_timesteps(timesteps)
        ab = _broadcast(self.alphas_cumprod, timesteps, original_samples)  # (N, 1, ...)
        return ab.sqrt() * original_samples + (1 - ab).sqrt() * noise

    def get_velocity(
        self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """(4) v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (``sample`` is x_0).

        Args:
            sample: x_0, shape (N, ...).
            noise: eps, same shape.
            timesteps: (N,) integer timesteps.

        Returns:
            v, same shape.
        """
        self._check_timesteps(timesteps)
        ab = _broadcast(self.alphas_cumprod, timesteps, sample)
        return ab.sqrt() * noise - (1 - ab).sqrt() * sample

    def training_target(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """What the network should output for ``prediction_type`` (eps, x_0 or v). Shape (N, ...)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return original_samples
        return self.get_velocity(original_samples, noise, timesteps)

    def predict_start_and_noise(
        self, model_output: torch.Tensor, sample: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert a network output at x_t into (x0_hat, eps_hat) using (3) and (4).

        Args:
            model_output: network output, shape (N, ...).
            sample: x_t, same shape.
            timesteps: (N,) integer timesteps (or a 0-d tensor, broadcast to all rows).

        Returns:
            (x0_hat, eps_hat), each the shape of ``sample``. x0_hat is clipped if ``clip_sample``.
        """
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(sample.shape[0])
        ab = _broadcast(self.alphas_cumprod, timesteps, sample)
        sqrt_ab, sqrt_1m_ab = ab.sqrt(), (1 - ab).sqrt()
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (sample - sqrt_1m_ab * eps) / sqrt_ab  # invert (3)
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (sample - sqrt_ab * x0) / sqrt_1m_ab.clamp_min(1e-8)
        else:
            # from (3) and (4): x_0 = sqrt(ab) x_t - sqrt(1-ab) v ; eps = sqrt(1-ab) x_t + sqrt(ab) v
            x0 = sqrt_ab * sample - sqrt_1m_ab * model_output
            eps = sqrt_1m_ab * sample + sqrt_ab * model_output
        if self.clip_sample:
            x0 = x0.clamp(-self.clip_sample_range, self.clip_sample_range)
            eps = (sample - sqrt_ab * x0) / sqrt_1m_ab.clamp_min(1e-8)
        return x0, eps

    # ------------------------------------------------------------------------------------
    # Sampling
    # ------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, sampler: SamplerType = "ddim") -> torch.Tensor:
        """Choose the sampling grid and the step rule.

        Timesteps are "trailing" (Lin et al. 2024): they start at T-1, so sampling starts from
        the most noisy step the model was trained on, and are evenly spaced by T // n.

        Args:
            num_inference_steps: n, 1 <= n <= T. ``n = T`` visits every training step.
            sampler: ``"ddim"`` (6) or ``"ddpm"`` (5).

        Returns:
            The (n,) descending integer timesteps (also stored in ``self.timesteps``).
        """
        if sampler not in _SAMPLERS:
            raise ValueError(f"sampler {sampler!r} not in {list(_SAMPLERS)}")
        n = int(num_inference_steps)
        if not (1 <= n <= self.num_train_timesteps):
            raise ValueError(
                f"num_inference_steps={n} must be in [1, {self.num_train_timesteps}] "
                "(diffusion.num_train_timesteps); lower diffusion.num_inference_steps"
            )
        step_ratio = self.num_train_timesteps / n
        ts = torch.round(torch.arange(self.num_train_timesteps, 0, -step_ratio)).long() - 1  # (n,)
        self.timesteps = ts
        self.num_inference_steps = n
        self.sampler = sampler
        return ts

    def previous_timestep(self, timestep: int) -> int:
        """The timestep after ``timestep`` on the current grid (-1 after the last)."""
        ts = self.timesteps.tolist()
        i = ts.index(int(timestep)) if int(timestep) in ts else None
        if i is None:
            raise ValueError(f"timestep {int(timestep)} is not on the grid {ts}; call set_timesteps first")
        return ts[i + 1] if i + 1 < len(ts) else -1

    def _alpha_bar(self, t: int) -> torch.Tensor:
        return self.alphas_cumprod[t] if t >= 0 else self.final_alpha_cumprod

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        *,
        eta: float = 0.0,
        generator: Optional[torch.Generator] = None,
        variance_noise: Optional[torch.Tensor] = None,
    ) -> SchedulerStepOutput:
        """One reverse step x_t -> x_{t_prev} with the rule chosen in ``set_timesteps``.

        Args:
            model_output: network output at (x_t, t), shape (N, ...).
            timestep: current t (an int on the grid of ``set_timesteps``).
            sample: x_t, shape (N, ...).
            eta: DDIM stochasticity (6); ignored by DDPM (which always adds noise except at t=0).
            generator: source of the added noise.
            variance_noise: the z of (5)/(6) given explicitly (overrides ``generator``).

        Returns:
            ``SchedulerStepOutput(prev_sample, pred_original_sample)``.
        """
        t = int(timestep)
        prev_t = self.previous_timestep(t)
        ab_t = self._alpha_bar(t).to(sample.device, sample.dtype)  # (2) alpha_bar_t
        ab_prev = self._alpha_bar(prev_t).to(sample.device, sample.dtype)  # alpha_bar_{t-1}
        tt = torch.full((sample.shape[0],), t, dtype=torch.long, device=sample.device)
        x0, eps = self.predict_start_and_noise(model_output, sample, tt)

        def noise_like() -> torch.Tensor:
            if variance_noise is not None:
                return variance_noise.to(sample.device, sample.dtype)
            return torch.randn(
                sample.shape, generator=generator, device=sample.device, dtype=sample.dtype
            )

        if self.sampler == "ddpm":
            beta_t = 1 - ab_t / ab_prev  # (1) generalised to strided grids
            alpha_t = 1 - beta_t
            # (5) posterior mean and variance
            mean = (ab_prev.sqrt() * beta_t / (1 - ab_t)) * x0 + (
                alpha_t.sqrt() * (1 - ab_prev) / (1 - ab_t)
            ) * sample
            var = (1 - ab_prev) / (1 - ab_t) * beta_t
            prev = mean + var.clamp_min(0).sqrt() * noise_like() if prev_t >= 0 else mean
        else:
            # (6) sigma_t, then the DDIM update
            var = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
            sigma = eta * var.clamp_min(0).sqrt()
            direction = (1 - ab_prev - sigma**2).clamp_min(0).sqrt() * eps
            prev = ab_prev.sqrt() * x0 + direction
            if eta > 0 and prev_t >= 0:
                prev = prev + sigma * noise_like()
        return SchedulerStepOutput(prev_sample=prev, pred_original_sample=x0)

    # ------------------------------------------------------------------------------------
    def _check_timesteps(self, timesteps: torch.Tensor) -> None:
        if timesteps.numel() and (
            int(timesteps.min()) < 0 or int(timesteps.max()) >= self.num_train_timesteps
        ):
            raise ValueError(
                f"timesteps must lie in [0, {self.num_train_timesteps}); got "
                f"[{int(timesteps.min())}, {int(timesteps.max())}]"
            )

    def sample_timesteps(
        self, n: int, device: torch.device | str = "cpu", generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """(n,) training timesteps drawn uniformly from [0, T)."""
        return torch.randint(
            0, self.num_train_timesteps, (n,), generator=generator, device="cpu"
        ).to(device)

    @classmethod
    def from_config(cls, diffusion_cfg) -> "NoiseScheduler":
        """Build from ``cfg.diffusion`` (``DiffusionConfig``)."""
        return cls(
            num_train_timesteps=diffusion_cfg.num_train_timesteps,
            beta_schedule=diffusion_cfg.beta_schedule,
            prediction_type=diffusion_cfg.prediction_type,
        )
