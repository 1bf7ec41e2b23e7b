"""Respaced DDPM of StableSR's inference scripts (STABLESR_REFERENCE §8.1–8.2), numpy + jnp.

The scripts re-register LDM's 1000-step "linear" schedule (β_t = (√β_0 + t/999·(√β_1 − √β_0))²,
float64, stored float32), keep float32 copies of √ā / √(1−ā) for `q_sample_respace`, then respace
to N steps: S = `space_timesteps(1000, [N])`, β'_i = 1 − ā[S_i]/ā[S_{i−1}] in float32, and
`register_schedule(given_betas=β')` recomputes every buffer in numpy from the float32 β' (float32
cumprod; float64 where ā'_prev enters). `RespacedSchedule` reproduces those dtypes step by step,
so its buffers equal the reference's float32 buffers (the goldens' `schedule.*`).

This differs from `pasd_jax.diffusion.schedule.NoiseSchedule` (diffusers semantics, float32
cumprod of float32 betas) in the dtype path, hence its own module.

`ddpm_step` is `p_sample` with eps parameterisation and `clip_denoised=False`:
`x0 = √(1/ā'_i)·x − √(1/ā'_i − 1)·eps`, `mean = c1_i·x0 + c2_i·x`,
`x' = mean + [i ≠ 0]·exp(½·logvar_i)·noise` (noise drawn at every step, also the last).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

BUFFER_NAMES = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2")


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`space_timesteps(num_timesteps, [steps])` sorted: `round(k·(T−1)/(N−1))` accumulated in float,
    Python round-half-even (as the reference). N = 1 gives [0]."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"cannot respace {num_timesteps} timesteps into {steps} steps")
    stride = (num_timesteps - 1) / (steps - 1) if steps > 1 else 1
    cur, taken = 0.0, []
    for _ in range(steps):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken))


def ldm_linear_alphas_cumprod(linear_start: float, linear_end: float, timesteps: int) -> np.ndarray:
    """float64 ā of LDM's `make_beta_schedule("linear")` (float64 linspace of √β, squared)."""
    betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas, axis=0)


class RespacedSchedule(NamedTuple):
    """float32 buffers of the respaced schedule ([N] each) plus the original-step tables."""

    timesteps: np.ndarray          # S, int64 [N]: the original step fed to the networks
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    alphas_cumprod_prev: np.ndarray
    sqrt_recip_alphas_cumprod: np.ndarray
    sqrt_recipm1_alphas_cumprod: np.ndarray
    posterior_variance: np.ndarray
    posterior_log_variance_clipped: np.ndarray
    posterior_mean_coef1: np.ndarray
    posterior_mean_coef2: np.ndarray
    sqrt_alphas_cumprod_full: np.ndarray            # [T] float32, for q_sample_respace
    sqrt_one_minus_alphas_cumprod_full: np.ndarray  # [T] float32

    @classmethod
    def build(cls, steps: int, *, linear_start: float = 0.00085, linear_end: float = 0.012,
              timesteps: int = 1000) -> "RespacedSchedule":
        ac64 = ldm_linear_alphas_cumprod(linear_start, linear_end, timesteps)
        ac32 = ac64.astype(np.float32)
        s = space_timesteps(timesteps, steps)
        new_betas, last = [], np.float32(1.0)
        for i in s:  # float32 torch arithmetic on the stored float32 buffer
            new_betas.append(np.float32(1.0) - ac32[i] / last)
            last = ac32[i]
        betas = np.asarray(new_betas, np.float32)
        alphas = np.float32(1.0) - betas
        acp = np.cumprod(alphas, axis=0, dtype=np.float32)
        acp_prev = np.append(1.0, acp[:-1].astype(np.float64))
        one_minus = (np.float32(1.0) - acp).astype(np.float64)  # float32 subtraction, as numpy does there
        b64 = betas.astype(np.float64)
        var = b64 * (1.0 - acp_prev) / one_minus
        f32 = lambda x: np.asarray(x, np.float32)
        return cls(
            timesteps=np.asarray(s, np.int64), betas=betas, alphas_cumprod=acp, alphas_cumprod_prev=f32(acp_prev),
            sqrt_recip_alphas_cumprod=f32(np.sqrt(np.float32(1.0) / acp)),
            sqrt_recipm1_alphas_cumprod=f32(np.sqrt(np.float32(1.0) / acp - np.float32(1.0))),
            posterior_variance=f32(var), posterior_log_variance_clipped=f32(np.log(np.maximum(var, 1e-20))),
            posterior_mean_coef1=f32(b64 * np.sqrt(acp_prev) / one_minus),
            posterior_mean_coef2=f32((1.0 - acp_prev) * np.sqrt(alphas).astype(np.float64) / one_minus),
            sqrt_alphas_cumprod_full=f32(np.sqrt(ac64)), sqrt_one_minus_alphas_cumprod_full=f32(np.sqrt(1.0 - ac64)))

    def buffers(self) -> dict[str, np.ndarray]:
        """The registered buffers by their reference names (golden `schedule.*`)."""
        return {name: getattr(self, name) for name in BUFFER_NAMES}

    def step_tables(self) -> dict[str, np.ndarray]:
        """Per-step arrays in sampling order (first = noisiest), for a `lax.scan`."""
        order = np.arange(len(self.timesteps))[::-1].copy()
        return {"index": order.astype(np.int32), "t": self.timesteps[order].astype(np.int32),
                "sqrt_recip": self.sqrt_recip_alphas_cumprod[order],
                "sqrt_recipm1": self.sqrt_recipm1_alphas_cumprod[order],
                "coef1": self.posterior_mean_coef1[order], "coef2": self.posterior_mean_coef2[order],
                "sigma_mask": np.where(order != 0, 1.0, 0.0).astype(np.float32),
                "logvar": self.posterior_log_variance_clipped[order]}

    def q_sample(self, x0, noise, t: int | None = None):
        """`q_sample_respace(x0, t)` with the 1000-step float32 tables (default t = T − 1)."""
        t = len(self.sqrt_alphas_cumprod_full) - 1 if t is None else t
        return self.sqrt_alphas_cumprod_full[t] * x0 + self.sqrt_one_minus_alphas_cumprod_full[t] * noise


def ddpm_step(x, eps, noise, row):
    """One `p_sample` (module docstring). `row`: one entry of `step_tables()` (scalars).
    Returns (x_next, x0, mean)."""
    x0 = row["sqrt_recip"] * x - row["sqrt_recipm1"] * eps
    mean = row["coef1"] * x0 + row["coef2"] * x
    return mean + row["sigma_mask"] * jnp.exp(0.5 * row["logvar"]) * noise, x0, mean
