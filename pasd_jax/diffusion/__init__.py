"""Diffusion schedules and samplers' update rules (diffusers semantics, pure JAX).

DDIM (`ddim_step`), UniPC, DPM-Solver++ and LCM; all but the bare `ddim_step` share the scan
interface of `schedulers.py` (`init_state`, `step(state, model_output, i)`).
"""

from pasd_jax.diffusion.ddim import DDIMArrays, ddim_step, ddim_timesteps, predict_x0_eps, prev_timestep
from pasd_jax.diffusion.dpm_solver import DPMSolverPP
from pasd_jax.diffusion.lcm import LCM
from pasd_jax.diffusion.schedule import NoiseSchedule, load_scheduler_config, rescale_zero_terminal_snr
from pasd_jax.diffusion.schedulers import DDIM, SCHEDULER_CLASSES, Scheduler, make_scheduler, scheduler_class_name
from pasd_jax.diffusion.unipc import UniPC

__all__ = [
    "DDIM",
    "DDIMArrays",
    "DPMSolverPP",
    "LCM",
    "NoiseSchedule",
    "SCHEDULER_CLASSES",
    "Scheduler",
    "UniPC",
    "ddim_step",
    "ddim_timesteps",
    "load_scheduler_config",
    "make_scheduler",
    "predict_x0_eps",
    "prev_timestep",
    "rescale_zero_terminal_snr",
    "scheduler_class_name",
]
