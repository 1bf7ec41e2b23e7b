"""StableSR's DDPM samplers as one `lax.scan` inside one `jax.jit` each (STABLESR_REFERENCE §8.2, §8.4).

* `ddpm_loop` mirrors `LatentDiffusionSRTextWT.sample → p_sample_loop` (the `_old` script): at
  every step the time-aware encoder runs on the clean LR latent with the step's original timestep,
  the SFT UNet predicts eps on the whole latent, and `respaced_ddpm.ddpm_step` moves x.
* `canvas_loop` mirrors `sample_canvas → p_sample_loop_canvas` (the `_oldcanvas(_tile)` scripts):
  per step, the latent is cut into T×T tiles (`pasd_jax.imaging.tiling.tile_origins`, the same grid
  and x-outer/y-inner order), encoder + UNet run per tile (batched `tiles_per_call` at a time under
  `lax.map`), the tile predictions are blended with the Gaussian weights (`gaussian_weights`,
  vertical centre T/2 as the reference), then one DDPM step on the whole latent. Written for one
  image per call, as the reference (quirk §10.16).

Differences: the reference multiplies tiles by float64 weights and accumulates into float32
buffers; we stay in float32 (JAX default), within the goldens' tolerance. Every random draw is an
explicit input (the caller decides: seeded `jax.random`, or the goldens' saved tensors).

Latents NHWC [B, h, w, 4]; context [1 or B, L, D]; noises [N, B, h, w, 4] in sampling order.
Both loops also return the latents after every step ([N, B, h, w, 4]) for inspection.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax.diffusion.respaced_ddpm import ddpm_step
from pasd_jax.imaging.tiling import gaussian_weights, tile_origins


def _eps(unet, encoder, params, x, z_lr, t, context):
    """feats = encoder(z_lr, t); eps = unet(x, t, context, feats); t scalar, batch from x."""
    tb = jnp.full((x.shape[0],), t, jnp.int32)
    ctx = jnp.broadcast_to(context, (x.shape[0],) + context.shape[1:])
    feats = encoder.apply({"params": params["struct_encoder"]}, z_lr, tb)
    return unet.apply({"params": params["unet"]}, x, tb, ctx, feats)


def make_ddpm_loop(unet, encoder):
    """-> jitted `loop(params, x_T, z_lr, context, tables, noises) -> (x_0, per-step latents)`.

    `params` holds "unet" and "struct_encoder"; `tables` = `RespacedSchedule.step_tables()`.
    """
    @jax.jit
    def loop(params, x_t, z_lr, context, tables, noises):
        def body(x, inputs):
            row, noise = inputs
            x_next, _, _ = ddpm_step(x, _eps(unet, encoder, params, x, z_lr, row["t"], context), noise, row)
            return x_next, x_next
        return jax.lax.scan(body, x_t, (tables, noises))
    return loop


def canvas_geometry(h: int, w: int, tile: int, overlap: int) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Tile origins (y, x) and [T, T] float32 weights of the latent canvas for an h×w latent."""
    if h < tile or w < tile:
        raise ValueError(f"latent {h}x{w} is smaller than the canvas tile {tile} (the reference needs every "
                         f"side >= input_size after upscaling, quirk §10.2)")
    return tile_origins(h, w, tile, overlap), gaussian_weights(tile, tile)


def blend_tiles(tiles: jnp.ndarray, origins, weights: np.ndarray, h: int, w: int) -> jnp.ndarray:
    """Σ W·tile / Σ W over the tiles [n, T, T, C] placed at `origins` -> [h, w, C] (in tile order)."""
    t = weights.shape[0]
    wt = jnp.asarray(weights)[:, :, None]
    acc = jnp.zeros((h, w, tiles.shape[-1]), jnp.float32)
    cnt = jnp.zeros((h, w, 1), jnp.float32)
    for j, (y, x) in enumerate(origins):
        acc = acc.at[y:y + t, x:x + t].add(tiles[j].astype(jnp.float32) * wt)
        cnt = cnt.at[y:y + t, x:x + t].add(wt)
    return acc / cnt


def _cut(a: jnp.ndarray, origins, t: int) -> jnp.ndarray:
    """[1, h, w, C] -> the tiles [n, T, T, C] at `origins`."""
    return jnp.stack([a[0, y:y + t, x:x + t] for y, x in origins])


def canvas_eps(unet, encoder, params, x, z_lr, t, context, *, origins, weights, tiles_per_call: int):
    """Blended eps [1, h, w, 4] of one canvas step (module docstring)."""
    size, n = weights.shape[0], len(origins)
    k = max(1, min(tiles_per_call, n))
    m = -(-n // k)
    xs, zs = _cut(x, origins, size), _cut(z_lr, origins, size)
    pad = ((0, m * k - n),) + ((0, 0),) * 3
    xs = jnp.pad(xs, pad).reshape((m, k) + xs.shape[1:])
    zs = jnp.pad(zs, pad).reshape((m, k) + zs.shape[1:])
    eps = jax.lax.map(lambda xz: _eps(unet, encoder, params, xz[0], xz[1], t, context), (xs, zs))
    eps = eps.reshape((m * k,) + eps.shape[2:])[:n]
    return blend_tiles(eps, origins, weights, x.shape[1], x.shape[2])[None]


@functools.lru_cache(maxsize=16)
def _canvas_loop(unet, encoder, h: int, w: int, tile: int, overlap: int, tiles_per_call: int):
    origins, weights = canvas_geometry(h, w, tile, overlap)

    @jax.jit
    def loop(params, x_t, z_lr, context, tables, noises):
        def body(x, inputs):
            row, noise = inputs
            eps = canvas_eps(unet, encoder, params, x, z_lr, row["t"], context, origins=origins,
                             weights=weights, tiles_per_call=tiles_per_call)
            x_next, _, _ = ddpm_step(x, eps, noise, row)
            return x_next, x_next
        return jax.lax.scan(body, x_t, (tables, noises))
    return loop


def canvas_loop(unet, encoder, params: Any, x_t, z_lr, context, tables, noises, *, tile: int, overlap: int,
                tiles_per_call: int = 4):
    """Aggregation sampling of one image: x_T, z_lr [1, h, w, 4] -> (x_0, per-step latents).
    Compiled once per (latent size, tile, overlap, tiles_per_call, step count)."""
    if x_t.shape[0] != 1:
        raise ValueError("canvas sampling takes one image per call (as the reference)")
    loop = _canvas_loop(unet, encoder, int(x_t.shape[1]), int(x_t.shape[2]), int(tile), int(overlap),
                        int(tiles_per_call))
    return loop(params, x_t, z_lr, context, tables, noises)
