"""diffusion: the noise scheduler used by training (add_noise) and sampling (set_timesteps/step)."""

from .scheduler import NoiseScheduler, SchedulerStepOutput

__all__ = ["NoiseScheduler", "SchedulerStepOutput"]
