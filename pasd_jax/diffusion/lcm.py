"""Latent-consistency sampling (Luo et al. 2023) with diffusers `LCMScheduler` semantics, in JAX.

Each step maps x_t to the consistency-model estimate and, except at the last step, re-noises it to
the next timestep with fresh Gaussian noise:

    x̂0 = (x_t − sqrt(1 − ᾱ_t) ε)/sqrt(ᾱ_t)                     (or v / x̂0 prediction; optional clip)
    denoised = c_out(t)·x̂0 + c_skip(t)·x_t,  c_skip = σ_d²/((10t)² + σ_d²), c_out = 10t/sqrt((10t)² + σ_d²)
    x_prev = sqrt(ᾱ_prev)·denoised + sqrt(1 − ᾱ_prev)·noise     (x_prev = denoised at the last step)

σ_d = 0.5, the factor 10 is `timestep_scaling`. Timesteps: N of the `original_inference_steps`
(50) distillation timesteps `k·j − 1` (k = T // 50), picked at `floor(linspace(0, 50, N, endpoint=False))`
from the top. The per-step scalars are float32 tables (pytree leaves) so a traced step index
works inside `lax.scan`; the caller draws the per-step `noise` (diffusers draws it from its
generator inside `step`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax.diffusion import sigmas as S

CLASS_NAME = "LCMScheduler"

# `LCMScheduler.__init__` defaults (diffusers 0.42).
LCM_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", trained_betas=None,
    original_inference_steps=50, clip_sample=False, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0,
    prediction_type="epsilon", thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0,
    timestep_spacing="leading", timestep_scaling=10.0, rescale_betas_zero_snr=False,
)


class LCMState(NamedTuple):
    """Scan carry: the current sample."""

    sample: jnp.ndarray


def lcm_timesteps(num_train: int, original_steps: int, n: int) -> np.ndarray:
    """Descending int64 `[n]` timesteps of `LCMScheduler.set_timesteps(n)` (strength 1)."""
    if original_steps > num_train:
        raise ValueError(f"{CLASS_NAME}: original_inference_steps {original_steps} > num_train_timesteps {num_train}")
    if n < 1 or n > original_steps:
        raise ValueError(f"{CLASS_NAME}: num_steps must be 1…original_inference_steps ({original_steps}), got {n}")
    k = num_train // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1].copy()
    idx = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
    return origin[idx]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["timesteps", "alphas_cumprod", "coef"],
    meta_fields=["prediction_type", "clip_sample", "clip_sample_range"],
)  # fmt: skip
@dataclasses.dataclass(frozen=True, eq=False)
class LCM:
    """An LCM schedule for N steps.

    timesteps `[N]` int32; alphas_cumprod `[T]` (train ᾱ, for the ANS start); coef `[N, 6]` float32 =
    (sqrt ᾱ_t, sqrt(1 − ᾱ_t), c_skip, c_out, sqrt ᾱ_prev, sqrt(1 − ᾱ_prev)), the last row's re-noise
    pair unused (the last step returns `denoised`).
    """

    timesteps: np.ndarray
    alphas_cumprod: np.ndarray
    coef: np.ndarray
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    needs_noise = True

    @property
    def num_steps(self) -> int:
        return int(np.shape(self.timesteps)[0])

    @classmethod
    def from_config(cls, scheduler_config: Mapping[str, Any], num_steps: int, **overrides: Any) -> LCM:
        """Tables of `LCMScheduler.from_config(cfg)` after `set_timesteps(num_steps)`."""
        cfg = S.merge_config(CLASS_NAME, LCM_DEFAULTS, scheduler_config, overrides)
        S.check_common(CLASS_NAME, cfg)
        n, T = int(num_steps), int(cfg["num_train_timesteps"])
        ts = lcm_timesteps(T, int(cfg["original_inference_steps"]), n)
        ac = S.train_alphas_cumprod(cfg, zero_snr_floor=False)
        final = np.float32(1.0) if cfg["set_alpha_to_one"] else ac[0]
        f32, one = np.float32, np.float32(1.0)
        coef = np.zeros((n, 6), np.float32)
        for i, t in enumerate(ts):
            prev_t = ts[i + 1] if i + 1 < n else t
            a_t = ac[t]
            a_prev = ac[prev_t] if prev_t >= 0 else final
            scaled = f32(t) * f32(cfg["timestep_scaling"])
            c_skip = f32(0.25) / (scaled * scaled + f32(0.25))
            c_out = scaled / np.sqrt(scaled * scaled + f32(0.25))
            coef[i] = (np.sqrt(a_t), np.sqrt(one - a_t), c_skip, c_out, np.sqrt(a_prev), np.sqrt(one - a_prev))
        return cls(timesteps=ts.astype(np.int32), alphas_cumprod=ac, coef=coef,
                   prediction_type=cfg["prediction_type"], clip_sample=bool(cfg["clip_sample"]),
                   clip_sample_range=float(cfg["clip_sample_range"]))

    def init_state(self, sample: jnp.ndarray) -> LCMState:
        return LCMState(jnp.asarray(sample, jnp.float32))

    def add_noise(self, x: jnp.ndarray, noise: jnp.ndarray, t) -> jnp.ndarray:
        """`LCMScheduler.add_noise`: sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·noise."""
        return S.add_noise_by_alpha_bar(self.alphas_cumprod, x, noise, t)

    def step(self, state: LCMState, model_output: jnp.ndarray, i, noise=None) -> tuple[LCMState, jnp.ndarray]:
        """One `LCMScheduler.step` at step index `i` (traced ok); `noise` (shape of the sample) re-noises."""
        if noise is None:
            raise ValueError("LCM.step needs `noise` (draw it with jax.random.normal, one draw per step)")
        x, out = state.sample, model_output.astype(jnp.float32)
        sa, sb, c_skip, c_out, sa_prev, sb_prev = (jnp.take(jnp.asarray(self.coef), i, axis=0)[j] for j in range(6))
        if self.prediction_type == "epsilon":
            x0 = (x - sb * out) / sa
        elif self.prediction_type == "sample":
            x0 = out
        else:  # v_prediction
            x0 = sa * x - sb * out
        if self.clip_sample:
            x0 = jnp.clip(x0, -self.clip_sample_range, self.clip_sample_range)
        denoised = c_out * x0 + c_skip * x
        renoised = sa_prev * denoised + sb_prev * noise
        x_next = jnp.where(i == self.num_steps - 1, denoised, renoised)
        return LCMState(x_next), x_next
