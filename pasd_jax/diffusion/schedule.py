"""Noise schedules with diffusers `DDIMScheduler` semantics: betas, ᾱ, inference timesteps, q(x_t|x_0).

The tables are built once in numpy, reproducing diffusers' torch float32 arithmetic (the result is
bit-equal on the CPUs we test; see `_torch_linspace_f32` and the float64-accumulated cumprod), and
are turned into `jnp` constants inside the functions that need them, so a `NoiseSchedule` can be
closed over by jitted code. Everything traced (`alpha_bar`, `add_noise`, `velocity`) works with
scalar or per-example `[B]` integer timesteps.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax.models.configs import UnsupportedConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# `DDIMScheduler.__init__` defaults: `NoiseSchedule.from_config(cfg)` == `DDIMScheduler.from_config(cfg)`.
DDIM_DEFAULTS: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    trained_betas=None,
    clip_sample=True,
    set_alpha_to_one=True,
    steps_offset=0,
    prediction_type="epsilon",
    thresholding=False,
    clip_sample_range=1.0,
    timestep_spacing="leading",
    rescale_betas_zero_snr=False,
)


def load_scheduler_config(folder_or_file: str | pathlib.Path) -> dict:
    """Read a diffusers scheduler config: a `.json` file, a `scheduler/` folder, or a pipeline root."""
    path = pathlib.Path(folder_or_file)
    for candidate in (path, path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    raise FileNotFoundError(f"no scheduler_config.json at or under {path}")


def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """`torch.linspace(start, end, n, dtype=torch.float32)` bit for bit (CPU kernel).

    torch rounds the ends to float32, takes a float32 step, and evaluates `start + step*i` for the
    first half and `end - step*(n-1-i)` for the second as a fused multiply-add (one rounding). A
    float32×(i < 2**24) product is exact in float64, so a float64 sum rounded once to float32
    reproduces the fma.
    """
    s, e = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([s], np.float32)
    step = np.float64(np.float32(e - s) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    out = np.where(i < n // 2, np.float64(s) + step * i, np.float64(e) - step * (n - 1 - i))
    return out.astype(np.float32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """`torch.cumprod` of a float32 tensor on CPU: accumulates in float64, stores float32."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """Cosine ("squaredcos_cap_v2") betas; mirrors diffusers `betas_for_alpha_bar` (cosine)."""

    def alpha_bar_fn(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar_fn((i + 1) / num_diffusion_timesteps) / alpha_bar_fn(i / num_diffusion_timesteps), max_beta)
        for i in range(num_diffusion_timesteps)
    ]
    return np.asarray(betas, np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift/scale sqrt(ᾱ) so ᾱ_{T-1} = 0 (Lin et al. 2023, Alg. 1); mirrors diffusers' float32 ops."""
    abar_sqrt = np.sqrt(_cumprod_f32(np.float32(1.0) - betas))
    first, last = abar_sqrt[0], abar_sqrt[-1]
    abar_sqrt = (abar_sqrt - last) * np.float32(first / (first - last))
    abar = abar_sqrt**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def broadcast_per_example(coef: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """Scalar or `[B]` coefficient -> `[B, 1, …, 1]` broadcasting against an `ndim`-rank sample.

    Same as diffusers' flatten-then-unsqueeze in `add_noise` / `get_velocity`.
    """
    return coef.reshape((-1,) + (1,) * (ndim - 1))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["betas", "alphas_cumprod", "final_alpha_cumprod"],
    meta_fields=[
        "num_train_timesteps", "prediction_type", "timestep_spacing", "steps_offset",
        "set_alpha_to_one", "clip_sample", "clip_sample_range",
    ],
)  # fmt: skip
@dataclasses.dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """Betas, ᾱ and DDIM options of a diffusers scheduler config (mirrors `DDIMScheduler.__init__`).

    Arrays are numpy float32 `[num_train_timesteps]` exactly as diffusers holds them; methods convert
    to `jnp`, so closing over a schedule bakes constants into jitted code. It is also a pytree (the
    three tables are leaves, the options static), so it can be a jit/scan argument. `final_alpha_cumprod`
    is the ᾱ used when the DDIM step lands before t = 0 (1.0 with `set_alpha_to_one`, else ᾱ_0).
    Compared by identity (eq=False), so it hashes.
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray
    final_alpha_cumprod: np.float32
    num_train_timesteps: int
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = True
    clip_sample_range: float = 1.0

    @classmethod
    def from_config(cls, scheduler_config: Mapping[str, Any], **overrides: Any) -> NoiseSchedule:
        """Build from a diffusers `scheduler_config.json` dict with `DDIMScheduler` defaults.

        Unknown keys (`_class_name`, `skip_prk_steps`, …) are ignored; `overrides` win over the file
        (e.g. `timestep_spacing="trailing"`). Dynamic thresholding is refused.
        """
        cfg = {**DDIM_DEFAULTS, **{k: v for k, v in scheduler_config.items() if k in DDIM_DEFAULTS}, **overrides}
        if cfg["thresholding"]:
            raise UnsupportedConfigError(
                "scheduler `thresholding=True` (dynamic thresholding) is not implemented; it is meant for "
                "pixel-space models, not latent diffusion — set it to false"
            )
        if cfg["prediction_type"] not in PREDICTION_TYPES:
            raise UnsupportedConfigError(f"prediction_type {cfg['prediction_type']!r} not in {PREDICTION_TYPES}")
        if cfg["timestep_spacing"] not in TIMESTEP_SPACINGS:
            raise UnsupportedConfigError(f"timestep_spacing {cfg['timestep_spacing']!r} not in {TIMESTEP_SPACINGS}")
        n = int(cfg["num_train_timesteps"])
        schedule = cfg["beta_schedule"]
        if cfg["trained_betas"] is not None:
            betas = np.asarray(cfg["trained_betas"], np.float32)
        elif schedule == "linear":
            betas = _torch_linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
        elif schedule == "scaled_linear":  # latent-diffusion schedule: linear in sqrt(beta)
            betas = _torch_linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n) ** 2
        elif schedule == "squaredcos_cap_v2":
            betas = betas_for_alpha_bar(n)
        else:
            raise UnsupportedConfigError(f"beta_schedule {schedule!r} is not implemented")
        if cfg["rescale_betas_zero_snr"]:
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = _cumprod_f32(np.float32(1.0) - betas)
        final = np.float32(1.0) if cfg["set_alpha_to_one"] else alphas_cumprod[0]
        return cls(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            final_alpha_cumprod=np.float32(final),
            num_train_timesteps=n,
            prediction_type=cfg["prediction_type"],
            timestep_spacing=cfg["timestep_spacing"],
            steps_offset=int(cfg["steps_offset"]),
            set_alpha_to_one=bool(cfg["set_alpha_to_one"]),
            clip_sample=bool(cfg["clip_sample"]),
            clip_sample_range=float(cfg["clip_sample_range"]),
        )

    @classmethod
    def load(cls, folder_or_file: str | pathlib.Path, **overrides: Any) -> NoiseSchedule:
        """`from_config(load_scheduler_config(folder_or_file), **overrides)`."""
        return cls.from_config(load_scheduler_config(folder_or_file), **overrides)

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        """Descending int64 inference timesteps; mirrors `DDIMScheduler.set_timesteps` (all spacings)."""
        n, T = int(num_inference_steps), self.num_train_timesteps
        if n > T:
            raise ValueError(f"num_inference_steps {n} > num_train_timesteps {T}")
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
        elif self.timestep_spacing == "leading":
            ts = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.int64)
            ts += self.steps_offset
        else:  # trailing
            ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        return ts

    def alpha_bar(self, t) -> jnp.ndarray:
        """ᾱ_t = alphas_cumprod[t] as float32 (t: int, traced int, or int array); e.g. `alpha_bar(900)`."""
        return jnp.take(jnp.asarray(self.alphas_cumprod), jnp.asarray(t))

    def add_noise(self, x0: jnp.ndarray, noise: jnp.ndarray, t) -> jnp.ndarray:
        """sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·noise; t scalar or `[B]`. Mirrors `DDIMScheduler.add_noise`."""
        abar = broadcast_per_example(self.alpha_bar(t), jnp.ndim(x0))
        return jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * noise

    def velocity(self, x0: jnp.ndarray, noise: jnp.ndarray, t) -> jnp.ndarray:
        """v-prediction target sqrt(ᾱ_t)·noise − sqrt(1−ᾱ_t)·x0; mirrors `DDIMScheduler.get_velocity`."""
        abar = broadcast_per_example(self.alpha_bar(t), jnp.ndim(x0))
        return jnp.sqrt(abar) * noise - jnp.sqrt(1 - abar) * x0
