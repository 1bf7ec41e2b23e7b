"""Host-side σ schedules shared by the multistep solvers (UniPC, DPM-Solver++), in numpy.

Mirrors the `set_timesteps` arithmetic of diffusers' `UniPCMultistepScheduler` and
`DPMSolverMultistepScheduler` (the two are the same up to a few documented differences): the train
tables σ_k = sqrt((1 − ᾱ_k)/ᾱ_k) in float32, the timestep spacings of a schedule with N + 1 points
whose last point is dropped, Karras σ (ρ = 7) with the σ → t inversion on log σ, and the final σ
("zero" or "sigma_min"). Everything here runs once per (config, N) on the host. The per-step solver
coefficients are evaluated in float32 with the same operations as diffusers' torch scalars (the
float32 log-SNR differences h carry ~1e-6 relative rounding that a float64 evaluation would not
reproduce), so trajectories agree to a few float32 ulp. At the end: the traced `add_noise` helpers
the schedulers share (diffusers' schedule-index lookup with its last-step fallback).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from pasd_jax.diffusion.schedule import PREDICTION_TYPES, TIMESTEP_SPACINGS, NoiseSchedule
from pasd_jax.models.configs import UnsupportedConfigError

BETA_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
             "rescale_betas_zero_snr")


def merge_config(class_name: str, defaults: Mapping[str, Any], config: Mapping[str, Any],
                 overrides: Mapping[str, Any]) -> dict:
    """diffusers `from_config` semantics: the class defaults, then the config's known keys, then overrides.

    Unknown override keys are an error (a typo would otherwise be silently ignored).
    """
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise TypeError(f"{class_name}: unknown option(s) {unknown}")
    return {**defaults, **{k: v for k, v in config.items() if k in defaults}, **overrides}


def refuse(class_name: str, cfg: Mapping[str, Any], **unsupported: Any) -> None:
    """Raise `UnsupportedConfigError` for every `key=value` of `unsupported` the config has set."""
    for key, off in unsupported.items():
        if key in cfg and cfg[key] != off and not (off is None and cfg[key] in (None, False)):
            raise UnsupportedConfigError(f"{class_name} option {key}={cfg[key]!r} is not implemented "
                                         f"(supported: {off!r})")


def check_common(class_name: str, cfg: Mapping[str, Any]) -> None:
    """Options every scheduler here refuses or validates the same way."""
    if cfg.get("thresholding"):
        raise UnsupportedConfigError(f"{class_name} `thresholding=True` (dynamic thresholding) is not implemented; "
                                     "it is meant for pixel-space models — set it to false")
    if cfg["prediction_type"] not in PREDICTION_TYPES:
        raise UnsupportedConfigError(f"{class_name} prediction_type {cfg['prediction_type']!r} not in "
                                     f"{PREDICTION_TYPES}")
    if cfg["timestep_spacing"] not in TIMESTEP_SPACINGS:
        raise UnsupportedConfigError(f"{class_name} timestep_spacing {cfg['timestep_spacing']!r} not in "
                                     f"{TIMESTEP_SPACINGS}")


def train_alphas_cumprod(cfg: Mapping[str, Any], zero_snr_floor: bool) -> np.ndarray:
    """ᾱ `[T]` float32 as the scheduler's `__init__` builds it.

    `zero_snr_floor`: UniPC and DPM-Solver set ᾱ_{T−1} = 2⁻²⁴ after a zero-terminal-SNR rescale (so
    σ_{T−1} stays finite); DDIM and LCM do not.
    """
    sched = NoiseSchedule.from_config({k: cfg[k] for k in BETA_KEYS if k in cfg})
    ac = np.array(sched.alphas_cumprod, np.float32)
    if zero_snr_floor and cfg.get("rescale_betas_zero_snr"):
        ac[-1] = np.float32(2.0**-24)
    return ac


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """σ_k = ((1 − ᾱ_k)/ᾱ_k)^½ in float32 `[T]` (diffusers' `self.sigmas` before `set_timesteps`)."""
    ac = alphas_cumprod.astype(np.float32)
    return np.sqrt((np.float32(1.0) - ac) / ac).astype(np.float32)


def spaced_timesteps(spacing: str, num_train: int, n: int, steps_offset: int, last_timestep: int | None = None
                     ) -> np.ndarray:
    """Descending int64 `[n]` timesteps of the multistep schedulers' `set_timesteps`.

    linspace: `linspace(0, L−1, n+1)` rounded, reversed, last dropped; leading: multiples of
    `L // (n+1)` (+ steps_offset) likewise; trailing: `arange(L, 0, −T/n)` rounded, minus one.
    `L` is `last_timestep` (DPM-Solver's λ-clipped end) or `num_train`.
    """
    last = num_train if last_timestep is None else int(last_timestep)
    if spacing == "linspace":
        ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif spacing == "leading":
        ratio = last // (n + 1)
        ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        ts += steps_offset
    elif spacing == "trailing":
        ts = np.arange(last, 0, -num_train / n).round().copy().astype(np.int64) - 1
    else:
        raise UnsupportedConfigError(f"timestep_spacing {spacing!r} not in {TIMESTEP_SPACINGS}")
    return ts


def karras_sigmas(in_sigmas: np.ndarray, n: int, sigma_min: float | None = None, sigma_max: float | None = None,
                  rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) σ ramp, float64 `[n]`: `(σ_max^(1/ρ) + r (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ`.

    `in_sigmas` is the descending train σ table; its ends are the defaults for σ_min / σ_max.
    """
    smin = float(in_sigmas[-1]) if sigma_min is None else float(sigma_min)
    smax = float(in_sigmas[0]) if sigma_max is None else float(sigma_max)
    ramp = np.linspace(0, 1, n)
    lo, hi = smin ** (1 / rho), smax ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional train timestep of each σ: linear interpolation of log σ over the train table."""
    sigmas = np.asarray(sigmas, np.float64)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    lo_v, hi_v = log_sigmas[low], log_sigmas[high]
    w = np.clip((lo_v - log_sigma) / (lo_v - hi_v), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigmas.shape)


def alpha_sigma(sigma) -> tuple[np.ndarray, np.ndarray]:
    """(α_t, σ_t) = (1/sqrt(σ² + 1), σ·α_t) of the VE σ in float32, as `_sigma_to_alpha_sigma_t`."""
    sigma = np.asarray(sigma, np.float32)
    one = np.float32(1.0)
    alpha = one / np.sqrt(sigma * sigma + one)
    return alpha, sigma * alpha


def log_snr(alpha, sigma) -> np.ndarray:
    """λ = log α_t − log σ_t in float32 (+inf for σ = 0), evaluated as diffusers does."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(alpha, np.float32)) - np.log(np.asarray(sigma, np.float32))


def conversion_coefficients(prediction_type: str, alpha: np.ndarray, sigma: np.ndarray, to_x0: bool) -> np.ndarray:
    """Per-step `(cs, co, cd)` float32 `[N, 3]` with `converted = (cs·x − co·out) / cd`.

    (α, σ) are the `[N]` float32 (α_t, σ_t) of each step. Reproduces diffusers'
    `convert_model_output` operation by operation: x̂0 from ε is `(x − σ_t ε)/α_t`, from v
    `α_t x − σ_t v`; ε from v is `α_t v + σ_t x` (cs = σ_t, co = −α_t); the identity conversions use
    cs = 0, co = −1, cd = 1 (exact); ε from x̂0 is `(x − α_t x̂0)/σ_t`.
    """
    one, zero = np.ones_like(alpha), np.zeros_like(alpha)
    table = {
        (True, "epsilon"): (one, sigma, alpha),
        (True, "v_prediction"): (alpha, sigma, one),
        (True, "sample"): (zero, -one, one),
        (False, "epsilon"): (zero, -one, one),
        (False, "v_prediction"): (sigma, -alpha, one),
        (False, "sample"): (one, alpha, sigma),
    }
    return np.stack(table[(bool(to_x0), prediction_type)], axis=-1).astype(np.float32)


def final_sigma(kind: str, last_sigma: float) -> float:
    """σ after the last step: 0 ("zero") or σ_min ("sigma_min": `last_sigma`, the caller's choice)."""
    if kind == "zero":
        return 0.0
    if kind == "sigma_min":
        return float(last_sigma)
    raise UnsupportedConfigError(f"final_sigmas_type {kind!r} not in ('zero', 'sigma_min')")


def first_train_sigma(alphas_cumprod: np.ndarray) -> np.float32:
    """σ of train step 0 in float32 (the "sigma_min" final σ of the non-Karras schedules)."""
    a0 = np.float32(alphas_cumprod[0])
    return np.float32(np.sqrt((np.float32(1.0) - a0) / a0))


# ---- traced helpers shared by the schedulers' `add_noise` ------------------------------------
def schedule_index(timesteps, t):
    """diffusers' `index_for_timestep` for a traced scalar `t`: the position of `t` in `timesteps`
    (the second one when it occurs twice), or the **last** position when `t` is not in the schedule."""
    ts = jnp.asarray(timesteps)
    hit = ts == jnp.asarray(t, ts.dtype)
    first = jnp.argmax(hit)
    second = jnp.argmax(hit & (jnp.arange(ts.shape[0]) > first))
    count = jnp.sum(hit)
    return jnp.where(count == 0, ts.shape[0] - 1, jnp.where(count > 1, second, first))


def add_noise_by_sigma(sigmas, timesteps, x, noise, t):
    """UniPC / DPM-Solver `add_noise(x, noise, t)`: α·x + σ_t·noise with (α, σ_t) from the *schedule's*
    σ at `schedule_index(timesteps, t)` (so a level outside the schedule uses the last step's σ)."""
    sigma = jnp.take(jnp.asarray(sigmas, jnp.float32), schedule_index(timesteps, t))
    alpha = 1.0 / jnp.sqrt(sigma * sigma + 1.0)
    return alpha * x + (sigma * alpha) * noise


def add_noise_by_alpha_bar(alphas_cumprod, x, noise, t):
    """DDIM / LCM `add_noise(x, noise, t)`: sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·noise, ᾱ looked up at t."""
    abar = jnp.take(jnp.asarray(alphas_cumprod, jnp.float32), jnp.asarray(t))
    return jnp.sqrt(abar) * x + jnp.sqrt(1.0 - abar) * noise
