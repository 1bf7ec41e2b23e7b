"""Periodic validation images: the inference sampler on a fixed LQ set, saved as LQ | SR | HQ grids.

Runs `pasd_jax.sampling.Sampler` (ANS start from the LQ latent, scanned DDIM, VAE decode) with the
current weights, without classifier-free guidance (no negative prompt at training time) and
without tiling or colour fix, jitted once per validation shape.

Shapes: lq [B, H, W, 3] in [0, 1], hq [B, H, W, 3] in [-1, 1], prompt_ids int32 [B, 77];
output SR float32 [B, H, W, 3] in [0, 1].
"""

from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np
from PIL import Image

from pasd_jax.assembly.bundle import PASDBundle
from pasd_jax.sampling.sampler import Noises, Sampler, SamplerSettings, latent_shape, make_inputs


def make_val_sampler(models: PASDBundle, num_steps: int, out_sharding=None) -> Callable:
    """jit(fn(params, lq, prompt_ids, key) -> SR) with `params` = {"unet", "controlnet", "vae", "text_encoder"}.

    `models` is the training bundle (networks + schedule, no params: they are the argument)."""
    sampler = Sampler(models, SamplerSettings(num_steps=num_steps, guidance=False, vae_tiling="never",
                                              latent_tiling=False), shard=False)
    te = models.text_encoder

    def run(params, lq, prompt_ids, key):
        text = te.apply({"params": params["text_encoder"]}, prompt_ids, method=te.encode)
        noises = Noises.draw(key, latent_shape(models, lq.shape))
        inputs = make_inputs(lq, text, noises, guidance_scale=1.0)
        return sampler(inputs, params)["image"]

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
