"""Diffusion schedules and the DDIM step (diffusers `DDIMScheduler` semantics, pure JAX)."""

from pasd_jax.diffusion.ddim import DDIMArrays, ddim_step, ddim_timesteps, predict_x0_eps, prev_timestep
from pasd_jax.diffusion.schedule import NoiseSchedule, load_scheduler_config, rescale_zero_terminal_snr

__all__ = [
    "DDIMArrays",
    "NoiseSchedule",
    "ddim_step",
    "ddim_timesteps",
    "load_scheduler_config",
    "predict_x0_eps",
    "prev_timestep",
    "rescale_zero_terminal_snr",
]
