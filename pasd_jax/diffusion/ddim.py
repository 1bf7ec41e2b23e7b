"""The DDIM update with diffusers `DDIMScheduler.step` semantics, as a pure traceable function.

`ddim_step` takes the current and previous timesteps explicitly (possibly traced int scalars), so
a sampler can `lax.scan` over the pairs from `ddim_timesteps`. Scheduler math runs in float32.
The sampler loop with the models lives elsewhere and shares this step.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from pasd_jax.diffusion.schedule import PREDICTION_TYPES, NoiseSchedule, broadcast_per_example


class DDIMArrays(NamedTuple):
    """The tables `ddim_step` reads, as a pytree: ᾱ `[T]` float32 and the ᾱ used for t < 0 (scalar)."""

    alphas_cumprod: jnp.ndarray
    final_alpha_cumprod: jnp.ndarray

    @classmethod
    def from_schedule(cls, schedule: NoiseSchedule) -> DDIMArrays:
        """The float32 `jnp` tables of `schedule`."""
        f32 = jnp.float32
        return cls(jnp.asarray(schedule.alphas_cumprod, f32), jnp.asarray(schedule.final_alpha_cumprod, f32))


def prev_timestep(t, num_train_timesteps: int, num_inference_steps: int):
    """`t − T // N`: the previous timestep `DDIMScheduler.step` uses, whatever the timestep spacing."""
    return t - num_train_timesteps // num_inference_steps


def ddim_timesteps(schedule: NoiseSchedule, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, prev_timesteps) int32 `[N]` each: what a scanned sampler iterates over."""
    ts = schedule.timesteps(num_inference_steps)
    prev = prev_timestep(ts, schedule.num_train_timesteps, num_inference_steps)
    return ts.astype(np.int32), prev.astype(np.int32)


def _is_zero(eta) -> bool:
    """True only for a concrete eta ≤ 0 (diffusers adds noise iff `eta > 0`)."""
    try:
        return float(eta) <= 0.0
    except Exception:  # traced eta: assume it may be positive
        return False


def predict_x0_eps(model_output, sample, alpha_prod_t, prediction_type: str = "epsilon"):
    """(x̂0, ε̂) from the model output; mirrors step 3 of `DDIMScheduler.step`. ᾱ_t broadcasts."""
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        return (sample - jnp.sqrt(beta_prod_t) * model_output) / jnp.sqrt(alpha_prod_t), model_output
    if prediction_type == "sample":
        return model_output, (sample - jnp.sqrt(alpha_prod_t) * model_output) / jnp.sqrt(beta_prod_t)
    if prediction_type == "v_prediction":
        x0 = jnp.sqrt(alpha_prod_t) * sample - jnp.sqrt(beta_prod_t) * model_output
        eps = jnp.sqrt(alpha_prod_t) * model_output + jnp.sqrt(beta_prod_t) * sample
        return x0, eps
    raise ValueError(f"prediction_type {prediction_type!r} not in {PREDICTION_TYPES}")


def ddim_step(
    schedule_arrays: DDIMArrays | NoiseSchedule,
    model_output: jnp.ndarray,
    t,
    prev_t,
    sample: jnp.ndarray,
    *,
    eta: float = 0.0,
    variance_noise: jnp.ndarray | None = None,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    return_x0: bool = False,
):
    """One DDIM update x_t → x_{prev_t}; mirrors `DDIMScheduler.step` (use_clipped_model_output=False).

    schedule_arrays: anything with `alphas_cumprod` `[T]` and `final_alpha_cumprod` (a `DDIMArrays`
      pytree or a `NoiseSchedule`).
    model_output, sample: same shape, e.g. `[B, H, W, C]` float32.
    t, prev_t: int scalars, possibly traced (use `prev_timestep` / `ddim_timesteps`); `[B]` also works.
      `prev_t < 0` reads `final_alpha_cumprod`, as diffusers does.
    eta: DDIM η. With η > 0 the caller draws `variance_noise` (shape of `sample`), like diffusers'
      `variance_noise=` argument; σ_t·variance_noise is added whenever it is given.
    prediction_type, clip_sample, clip_sample_range: static; take them from the `NoiseSchedule`.
    Returns prev_sample, or (prev_sample, pred_original_sample) with `return_x0`.
    """
    if variance_noise is None and not _is_zero(eta):
        raise ValueError("ddim_step with eta > 0 needs `variance_noise` (draw it with jax.random.normal)")
    ac = jnp.asarray(schedule_arrays.alphas_cumprod, jnp.float32)
    final = jnp.asarray(schedule_arrays.final_alpha_cumprod, jnp.float32)
    t, prev_t = jnp.asarray(t), jnp.asarray(prev_t)
    ndim = jnp.ndim(sample)
    alpha_prod_t = broadcast_per_example(jnp.take(ac, t), ndim)
    alpha_prod_prev = broadcast_per_example(jnp.where(prev_t >= 0, jnp.take(ac, jnp.maximum(prev_t, 0)), final), ndim)
    beta_prod_t, beta_prod_prev = 1 - alpha_prod_t, 1 - alpha_prod_prev

    pred_x0, pred_eps = predict_x0_eps(model_output, sample, alpha_prod_t, prediction_type)
    if clip_sample:
        pred_x0 = jnp.clip(pred_x0, -clip_sample_range, clip_sample_range)

    # σ_t(η) = η · sqrt((1 − ᾱ_prev)/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_prev))   (DDIM eq. 16)
    variance = (beta_prod_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_prev)
    std_dev_t = eta * jnp.sqrt(variance)
    direction = jnp.sqrt(1 - alpha_prod_prev - std_dev_t**2) * pred_eps
    prev_sample = jnp.sqrt(alpha_prod_prev) * pred_x0 + direction
    if variance_noise is not None:
        prev_sample = prev_sample + std_dev_t * variance_noise
    return (prev_sample, pred_x0) if return_x0 else prev_sample
