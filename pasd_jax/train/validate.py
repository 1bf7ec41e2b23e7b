"""Periodic validation images: a short DDIM run on a fixed LQ set, saved as LQ | SR | HQ grids.

A deliberately small sampler (no classifier-free guidance, no tiling, pure-noise start at the
first DDIM timestep) built on `pasd_jax.diffusion.ddim.ddim_step`, scanned and jitted once; it
tracks training progress, it is not the inference pipeline (that is `pasd_jax.sampling`, which
adds ANS, CFG, tiling and colour fixes).

Shapes: lq [B, H, W, 3] in [0, 1], hq [B, H, W, 3] in [-1, 1], prompt_ids int32 [B, 77];
output SR float32 [B, H, W, 3] in [0, 1].
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from pasd_jax.diffusion.ddim import DDIMArrays, ddim_step, ddim_timesteps
from pasd_jax.diffusion.schedule import NoiseSchedule


def make_val_sampler(models, schedule: NoiseSchedule, num_steps: int, latent_scale: float,
                     out_sharding=None) -> Callable:
    """jit(fn(params, lq, prompt_ids, key) -> SR) with `params` = {"unet", "controlnet", "vae", "text_encoder"}."""
    ts, prev = ddim_timesteps(schedule, num_steps)
    tables = DDIMArrays.from_schedule(schedule)
    down = 2 ** (len(models.vae.block_out_channels) - 1)

    def run(params, lq, prompt_ids, key):
        text = models.text_encoder.apply({"params": params["text_encoder"]}, prompt_ids, method="encode")
        b, h, w, _ = lq.shape
        x = jax.random.normal(key, (b, h // down, w // down, models.vae.latent_channels), jnp.float32)

        def body(x, tp):
            t = jnp.full((b,), tp[0], jnp.int32)
            _, res, mid = models.controlnet.apply({"params": params["controlnet"]}, x, t, text, lq)
            out = models.unet.apply({"params": params["unet"]}, x, t, text, down_block_additional_residuals=res,
                                    mid_block_additional_residual=mid)
            x = ddim_step(tables, out.astype(jnp.float32), tp[0], tp[1], x,
                          prediction_type=schedule.prediction_type)
            return x, None

        x, _ = jax.lax.scan(body, x, (jnp.asarray(ts), jnp.asarray(prev)))
        image = models.vae.apply({"params": params["vae"]}, x / latent_scale, method="decode")
        return jnp.clip(image / 2 + 0.5, 0.0, 1.0)

    return jax.jit(run, out_shardings=out_sharding)


def grid(lq: np.ndarray, sr: np.ndarray, hq: np.ndarray) -> np.ndarray:
    """uint8 [B·H, 3·W, 3]: one row per example, LQ | SR | HQ (hq given in [-1, 1])."""
    rows = [np.concatenate([lq[i], sr[i], hq[i] / 2 + 0.5], axis=1) for i in range(lq.shape[0])]
    return np.clip(np.round(np.concatenate(rows, axis=0) * 255.0), 0, 255).astype(np.uint8)


def save_grid(workdir: str, step: int, lq: np.ndarray, sr: np.ndarray, hq: np.ndarray) -> str:
    """Write `workdir/val/step_{step:07d}.png`; returns its path."""
    folder = os.path.join(workdir, "val")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{step:07d}.png")
    Image.fromarray(grid(lq, sr, hq)).save(path)
    return path
