"""The scan interface every sampler scheduler implements, the DDIM adapter, and the factory.

A scheduler here is a frozen pytree built for a fixed number of steps N (its tables are leaves,
so it can be closed over as constants or passed into `jax.jit`):

    sched = make_scheduler("unipc", scheduler_config, num_steps=20)
    state = sched.init_state(x_T)                       # carry of the lax.scan
    def body(state, i):                                 # i: traced int32 step index
        out = model(state.sample, sched.timesteps[i])
        state, x = sched.step(state, out, i, noise)     # noise only if sched.needs_noise
        return state, x

`timesteps` `[N]` int32 are the model's t per step, `alphas_cumprod` `[T]` the train ᾱ (the ANS
start uses them in closed form), `add_noise(x, noise, t)` the class's own diffusers `add_noise`
(UniPC / DPM-Solver look t up in the schedule's σ, falling back to the last step), `needs_noise` says whether `step` takes fresh Gaussian noise
(DDIM with η > 0, LCM). Each class reproduces its diffusers namesake (`DDIMScheduler`,
`UniPCMultistepScheduler`, `DPMSolverMultistepScheduler`, `LCMScheduler`) step for step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax.diffusion.ddim import DDIMArrays, ddim_step, ddim_timesteps, prev_timestep
from pasd_jax.diffusion.dpm_solver import DPMSolverPP
from pasd_jax.diffusion.lcm import LCM
from pasd_jax.diffusion.schedule import NoiseSchedule
from pasd_jax.diffusion.sigmas import add_noise_by_alpha_bar
from pasd_jax.diffusion.unipc import UniPC
from pasd_jax.models.configs import UnsupportedConfigError

# CLI name -> diffusers class name.
SCHEDULER_CLASSES: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "lcm": "LCMScheduler",
}
# What `--scheduler dpmpp_2m` means whatever the config file says: 2M = second order, midpoint.
_NAME_OVERRIDES: dict[str, dict] = {"dpmpp_2m": dict(algorithm_type="dpmsolver++", solver_order=2)}


class Scheduler(Protocol):
    """What the sampler's scan needs from a scheduler (see the module docstring)."""

    timesteps: Any
    alphas_cumprod: Any
    needs_noise: bool

    @property
    def num_steps(self) -> int: ...

    def init_state(self, sample: jnp.ndarray) -> Any: ...

    def step(self, state: Any, model_output: jnp.ndarray, i, noise=None) -> tuple[Any, jnp.ndarray]: ...

    def add_noise(self, x: jnp.ndarray, noise: jnp.ndarray, t) -> jnp.ndarray: ...


class DDIMState(NamedTuple):
    """Scan carry of the DDIM adapter: the current sample."""

    sample: jnp.ndarray


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["timesteps", "prev_timesteps", "arrays"],
    meta_fields=["eta", "prediction_type", "clip_sample", "clip_sample_range"],
)  # fmt: skip
@dataclasses.dataclass(frozen=True, eq=False)
class DDIM:
    """`ddim_step` behind the scan interface: steps t_i → t_i − T // N, ᾱ tables from a `NoiseSchedule`."""

    timesteps: np.ndarray
    prev_timesteps: np.ndarray
    arrays: DDIMArrays
    eta: float = 0.0
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    @property
    def needs_noise(self) -> bool:
        return self.eta > 0

    @property
    def alphas_cumprod(self):
        return self.arrays.alphas_cumprod

    @property
    def num_steps(self) -> int:
        return int(np.shape(self.timesteps)[0])

    @classmethod
    def from_schedule(cls, schedule: NoiseSchedule, num_steps: int | None = None, *, timesteps=None,
                      eta: float = 0.0) -> DDIM:
        """DDIM over `schedule.timesteps(num_steps)`, or over explicit descending `timesteps`."""
        if timesteps is None:
            ts, prev = ddim_timesteps(schedule, num_steps)
        else:
            ts = np.asarray(timesteps, np.int32).reshape(-1)
            prev = prev_timestep(ts, schedule.num_train_timesteps, len(ts)).astype(np.int32)
        return cls(timesteps=ts, prev_timesteps=prev, arrays=DDIMArrays.from_schedule(schedule), eta=float(eta),
                   prediction_type=schedule.prediction_type, clip_sample=schedule.clip_sample,
                   clip_sample_range=schedule.clip_sample_range)

    @classmethod
    def from_config(cls, scheduler_config: Mapping[str, Any], num_steps: int, *, eta: float = 0.0,
                    **overrides: Any) -> DDIM:
        return cls.from_schedule(NoiseSchedule.from_config(scheduler_config, **overrides), num_steps, eta=eta)

    def init_state(self, sample: jnp.ndarray) -> DDIMState:
        return DDIMState(jnp.asarray(sample, jnp.float32))

    def add_noise(self, x: jnp.ndarray, noise: jnp.ndarray, t) -> jnp.ndarray:
        """`DDIMScheduler.add_noise`: sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·noise."""
        return add_noise_by_alpha_bar(self.arrays.alphas_cumprod, x, noise, t)

    def step(self, state: DDIMState, model_output: jnp.ndarray, i, noise=None) -> tuple[DDIMState, jnp.ndarray]:
        """`ddim_step` from `timesteps[i]` to `prev_timesteps[i]`; `noise` is the η > 0 variance noise."""
        t = jnp.take(jnp.asarray(self.timesteps), i)
        prev_t = jnp.take(jnp.asarray(self.prev_timesteps), i)
        x = ddim_step(self.arrays, model_output, t, prev_t, state.sample, eta=self.eta, variance_noise=noise,
                      prediction_type=self.prediction_type, clip_sample=self.clip_sample,
                      clip_sample_range=self.clip_sample_range)
        return DDIMState(x), x


_BY_CLASS = {"DDIMScheduler": DDIM, "UniPCMultistepScheduler": UniPC, "DPMSolverMultistepScheduler": DPMSolverPP,
             "LCMScheduler": LCM}


def scheduler_class_name(name_or_class: str) -> str:
    """`"unipc"` or `"UniPCMultistepScheduler"` -> the diffusers class name; unknown names raise."""
    if name_or_class in SCHEDULER_CLASSES:
        return SCHEDULER_CLASSES[name_or_class]
    if name_or_class in _BY_CLASS:
        return name_or_class
    raise UnsupportedConfigError(f"scheduler {name_or_class!r} is not implemented; choose one of "
                                 f"{sorted(SCHEDULER_CLASSES)} (or their diffusers classes {sorted(_BY_CLASS)})")


def make_scheduler(name_or_class: str, scheduler_config: Mapping[str, Any], num_steps: int, *, eta: float = 0.0,
                   **overrides: Any):
    """Build the scheduler `name_or_class` (CLI name or diffusers class) for `num_steps` steps.

    `scheduler_config` is any diffusers scheduler config (e.g. SD1.5's PNDM one): like diffusers'
    `Class.from_config`, the keys the class knows are taken and the rest ignored. `eta` is DDIM's η.
    """
    cls_name = scheduler_class_name(name_or_class)
    overrides = {**_NAME_OVERRIDES.get(name_or_class, {}), **overrides}
    if cls_name == "DDIMScheduler":
        return DDIM.from_config(scheduler_config, num_steps, eta=eta, **overrides)
    if eta:
        raise ValueError(f"eta is a DDIM option; {cls_name} is deterministic or draws its own noise")
    return _BY_CLASS[cls_name].from_config(scheduler_config, num_steps, **overrides)
