"""Latent tiling geometry and Gaussian blending weights of PASD's pipeline (PASD_REFERENCE §7.5), numpy.

PASD (after StableSR / MultiDiffusion) splits a large latent into overlapping T×T tiles, runs
ControlNet + UNet on each tile and blends the noise predictions with Gaussian weights:

* tiling is on when `h·w > T²` (latent pixels); then `T ← min(T, h, w)`;
* along the width, R = smallest r ≥ 1 with (r−1)(T−ov) + T ≥ w tiles at x = r·(T−ov), the last one
  snapped to x = w − T; along the height likewise;
* `eps = Σ_tiles W·eps_tile / Σ_tiles W`, with W the outer product of 1-D Gaussians (var 0.01).

This module is the host-side geometry plus a straightforward numpy `blend` that mirrors the torch
accumulation; it is the test oracle for the jitted blending in the sampler. Latents are NHWC, tile
origins are `(y, x)` in latent pixels, and the image crop for a tile is `[8y:8(y+T), 8x:8(x+T)]`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

#: Variance of the blending Gaussians, in units of the tile size (reference `var = 0.01`).
GAUSSIAN_VAR = 0.01


def needs_tiling(h: int, w: int, tile: int) -> bool:
    """Whether the reference tiles a latent of h×w: `h·w > tile²`."""
    return h * w > tile * tile


def effective_tile(h: int, w: int, tile: int) -> int:
    """Tile side actually used for an h×w latent: `min(tile, h, w)`."""
    if min(h, w, tile) < 1:
        raise ValueError(f"latent {h}x{w} and tile {tile} must be positive")
    return min(tile, h, w)


def _axis_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts along one axis: r·(T−ov) for all but the last tile, which starts at length − T.

    Mirrors the reference's `while cur < length: cur = max(n·T − ov·n, 0) + T; n += 1` grid count.
    """
    if tile >= length:
        return [0]
    stride = tile - overlap
    if stride <= 0:
        # The reference loops forever here; refuse instead.
        raise ValueError(f"overlap ({overlap}) must be smaller than the tile ({tile}) when {length} "
                         f"needs more than one tile")
    n = 1 + math.ceil((length - tile) / stride)
    return [r * stride for r in range(n - 1)] + [length - tile]


def tile_origins(h: int, w: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Origins `(y, x)` of the T×T tiles, `T = effective_tile(h, w, tile)`, in the reference's order.

    The reference loops over x ("rows") outside and y ("cols") inside; this order is also the order
    of accumulation in `blend`. Every origin satisfies 0 ≤ y ≤ h − T, 0 ≤ x ≤ w − T, and the tiles
    cover the whole latent. Callers decide with `needs_tiling` whether to tile at all.
    """
    if overlap < 0:
        raise ValueError(f"overlap must be non-negative, got {overlap}")
    t = effective_tile(h, w, tile)
    xs = _axis_origins(w, t, overlap)
    ys = _axis_origins(h, t, overlap)
    return [(y, x) for x in xs for y in ys]


def gaussian_weights(tile_h: int, tile_w: int, *, reference_centres: bool = True,
                     dtype=np.float32) -> np.ndarray:
    """Blending weights `W[j, i] = wy[j]·wx[i]` [tile_h, tile_w], computed in float64, cast to dtype.

    Mirrors the pipeline's `_gaussian_weights`:
    `wx[i] = exp(−(i − cx)² / tile_w² / (2·var)) / sqrt(2π·var)` and likewise wy with tile_h, cy.
    With `reference_centres=True` (parity, §9.6) cx = (tile_w − 1)/2 but cy = tile_h/2, so the
    vertical bump sits half a pixel low; `False` uses the symmetric (tile_h − 1)/2 for y too.
    Pass `dtype=np.float64` for the exact reference values (torch keeps them in float64).
    """
    var = GAUSSIAN_VAR

    def bump(n: int, centre: float) -> np.ndarray:
        i = np.arange(n, dtype=np.float64)
        return np.exp(-(i - centre) * (i - centre) / (n * n) / (2 * var)) / np.sqrt(2 * np.pi * var)

    cy = tile_h / 2 if reference_centres else (tile_h - 1) / 2
    return np.outer(bump(tile_h, cy), bump(tile_w, (tile_w - 1) / 2)).astype(dtype)


def blend(tiles_eps: np.ndarray | Sequence[np.ndarray], origins: Sequence[tuple[int, int]],
          weights: np.ndarray, h: int, w: int) -> np.ndarray:
    """Reference weighted blend of per-tile predictions into the full latent (numpy oracle).

    tiles_eps: [N, B, T, T, C] (or a sequence of N [B, T, T, C]), in the order of `origins`;
    weights: [T, T] as from `gaussian_weights`. Returns float32 [B, h, w, C].

    Mirrors the torch code: the weights are a float64 tensor, so each `tile·W` product and each
    in-place `+=` is evaluated in float64 and stored into float32 buffers (`noise_pred`,
    `contributors`), accumulated in tile order; then `noise_pred /= contributors` in float32.
    """
    tiles = [np.asarray(t) for t in tiles_eps]
    if len(tiles) != len(origins):
        raise ValueError(f"{len(tiles)} tiles for {len(origins)} origins")
    if not tiles:
        raise ValueError("no tiles to blend")
    wt = np.asarray(weights, dtype=np.float64)
    th, tw = wt.shape
    b, c = tiles[0].shape[0], tiles[0].shape[-1]
    acc = np.zeros((b, h, w, c), np.float32)
    norm = np.zeros((b, h, w, c), np.float32)
    w4 = wt[None, :, :, None]
    for tile, (y, x) in zip(tiles, origins):
        if tile.shape != (b, th, tw, c):
            raise ValueError(f"tile shape {tile.shape} != {(b, th, tw, c)}")
        if not (0 <= y <= h - th and 0 <= x <= w - tw):
            raise ValueError(f"tile at (y={y}, x={x}) does not fit in a {h}x{w} latent")
        sl = (slice(None), slice(y, y + th), slice(x, x + tw), slice(None))
        acc[sl] = (acc[sl].astype(np.float64) + tile.astype(np.float64) * w4).astype(np.float32)
        norm[sl] = (norm[sl].astype(np.float64) + w4).astype(np.float32)
    return acc / norm
