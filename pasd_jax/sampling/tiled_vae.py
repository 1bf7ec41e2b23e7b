"""Tiled VAE encode / decode for very large images, GroupNorm statistics shared across tiles.

Mirrors the tiled VAE PASD's pipeline installs (multidiffusion-upscaler's `VAEHook`, non-fast
mode; PASD_REFERENCE §7.6):

* it is active only when `max(H, W) > tile + 2·pad` (encoder: tile 1024, pad 32 image px;
  decoder: tile 224, pad 11 latent px) — `needs_tiled_encode` / `needs_tiled_decode`;
* each axis is cut into `n = max(ceil((L − 2·pad) / tile), 1)` cores of a balanced size `T`
  (`ceil((L − 2·pad) / n)` rounded up to a multiple of 32, else 16, 8, … while it stays ≤ tile,
  the reference's `get_best_tile_size`); the first core also takes the leading `pad`, the last one
  runs to the image edge; every core is seen with `pad` pixels of context on each side;
* every GroupNorm normalises with the per-tile means and biased variances averaged over all tiles;
  otherwise tiles are independent (the mid-block attention is per tile, which is what makes a
  4096² image possible at all: global attention over its 512² latent would need a 2.6e5² matrix);
* each tile's core is cropped from its output and the cores are stitched.

Deviations from the reference, both small and deliberate:

* **Equal tile sizes.** The reference clips edge tiles at the image border (smaller tiles, weights
  ∝ pixel count); here every padded window has the same size `T + 2·pad` and edge windows are
  shifted inward instead, so all tiles stack on the batch axis and weigh equally. Tiling is still
  not the identity: outputs differ slightly from the untiled VAE, as in the reference.
* **Encoder input is cropped to a multiple of the VAE factor f** (8 for SD) so every window starts
  on the latent grid; the latent shape is unchanged (`H // f`), only the last latent row/column
  loses the < f trailing pixels it would otherwise see. PASD always feeds multiples of 8.

Execution (see `AutoencoderKL.norm_over_batch` / `attention_query_chunk`): the tiles of one image
are stacked on the batch axis and run through a clone of the VAE whose GroupNorms pool statistics
over that axis and whose mid-block attention runs tile by tile, `attention_query_chunk` queries at a
time. Images of a batch are processed one after another (`lax.map`). Everything is static in the
shapes, so both functions are jittable.

Memory: a few stacked full-resolution activations of one image (≈ 1.1–1.6× the untiled activation
size, the overlap) plus one [chunk, tokens] score block, instead of the untiled VAE's [tokens,
tokens] scores. Measured with `benchmarks/tiled_vae.py`: SD1.5-shape VAE, fp32, H100 (device peak,
compile autotuning included): encode 2048² 15 GiB / 4096² 60 GiB, decode 2048² 28 GiB / 4096² 75 GiB
(XLA temp 63 GiB: a 4096² decode just fits 80 GB); tiny VAE, CPU: 4096² encode 4.4 GiB peak RSS,
decode 12.0 GiB (14.7 on the 2-core dev box; XLA temp 3.4 / 11.0 GiB). A tile-sequential executor (the reference runs tile by
tile and holds one activation per tile) could need less. Running the segments between norms one tile
at a time was tried twice and made XLA's temp buffers larger, not smaller: with `nn.scan` (tiny VAE
2048²: encode 0.8 -> 1.8 GiB, decode 2.4 -> 3.6 GiB; SD 4096² decode 88 -> 184 GiB, CPU backend) and
unrolled with in-place `dynamic_update_slice` assembly (encode 1.1, decode 3.0 GiB). XLA already
reuses the batched buffers well, so the batched form stays.

Boxes are `(y0, y1, x0, x1)`, half-open, in the units of the array being tiled (image pixels for
encode, latent pixels for decode). Arrays are NHWC.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

# Reference tile sizes and pads (encoder: image px, decoder: latent px), written in `defaults`.
from pasd_jax.sampling.defaults import DECODER_PAD, DECODER_TILE, ENCODER_PAD, ENCODER_TILE

#: Queries per attention block inside a tile: scores take chunk × tokens floats (1024 × 214² ≈ 188 MB).
DEFAULT_QUERY_CHUNK = 1024

Box = Tuple[int, int, int, int]


class Tile(NamedTuple):
    """One tile: `core` is the region of the output it writes, `padded` the input window it sees."""

    core: Box
    padded: Box


class AxisLayout(NamedTuple):
    """Tiling of one axis: `cores[i] = (start, end)`, `starts[i]` = window start, window size `size`."""

    cores: Tuple[Tuple[int, int], ...]
    starts: Tuple[int, ...]
    size: int


def _needs_tiling(h: int, w: int, tile: int, pad: int) -> bool:
    return max(h, w) > tile + 2 * pad


def needs_tiled_encode(h: int, w: int, tile: int = ENCODER_TILE, pad: int = ENCODER_PAD) -> bool:
    """Whether the reference tiles the encoder for an h×w *image*: `max(h, w) > tile + 2·pad`."""
    return _needs_tiling(h, w, tile, pad)


def needs_tiled_decode(h: int, w: int, tile: int = DECODER_TILE, pad: int = DECODER_PAD) -> bool:
    """Whether the reference tiles the decoder for an h×w *latent*: `max(h, w) > tile + 2·pad`."""
    return _needs_tiling(h, w, tile, pad)


def best_tile_size(lower: int, upper: int, multiple: int = 1) -> int:
    """Smallest size ≥ `lower` that is a multiple of 32 and ≤ `upper`, else of 16, 8, … down to
    `multiple` (mirrors the reference's `get_best_tile_size`, which goes down to 2).

    Requires `upper % multiple == 0` and `lower ≤ upper`, so the last candidate always fits.
    """
    divider = 32
    while divider >= max(multiple, 1):
        if divider % multiple == 0:
            candidate = -(-lower // divider) * divider
            if candidate <= upper:
                return candidate
        divider //= 2
    return -(-lower // multiple) * multiple


def axis_layout(length: int, tile: int, pad: int, multiple: int = 1) -> AxisLayout:
    """Cores and equal-size windows along one axis of `length` (see the module docstring).

    n = 1 (length ≤ tile + 2·pad): one window, the whole axis. Otherwise the core boundaries are
    `0, pad + T, pad + 2T, …, pad + (n−1)T, length`, the window size is `T + 2·pad` and window i
    starts at `clip(core_start_i − pad, 0, length − size)`, which always contains core i.
    All boundaries are multiples of `multiple` when `length`, `tile` and `pad` are.
    """
    if length < 1 or tile < 1 or pad < 0:
        raise ValueError(f"bad tiling: length {length}, tile {tile}, pad {pad}")
    if tile % multiple or pad % multiple:
        raise ValueError(f"tile ({tile}) and pad ({pad}) must be multiples of {multiple}")
    n = max(math.ceil((length - 2 * pad) / tile), 1)
    if n == 1:
        return AxisLayout(((0, length),), (0,), length)
    size_t = best_tile_size(math.ceil((length - 2 * pad) / n), tile, multiple)
    bounds = [0] + [pad + i * size_t for i in range(1, n)] + [length]
    if any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"degenerate tiling of {length} with tile {tile}, pad {pad}: bounds {bounds}")
    size = size_t + 2 * pad
    cores = tuple(zip(bounds[:-1], bounds[1:]))
    starts = tuple(min(max(a - pad, 0), length - size) for a, _ in cores)
    return AxisLayout(cores, starts, size)


def tile_layout(h: int, w: int, tile: int, pad: int, multiple: int = 1) -> list[Tile]:
    """The tiles of an h×w array, row-major (y outer, x inner, the reference's loop order).

    All `padded` boxes have the same size, lie inside the array and contain their `core`; the cores
    partition the array. Pure Python; see `axis_layout` for one axis.
    """
    ys, xs = axis_layout(h, tile, pad, multiple), axis_layout(w, tile, pad, multiple)
    return [Tile((cy[0], cy[1], cx[0], cx[1]), (sy, sy + ys.size, sx, sx + xs.size))
            for cy, sy in zip(ys.cores, ys.starts) for cx, sx in zip(xs.cores, xs.starts)]


def _extract(img: jnp.ndarray, ys: AxisLayout, xs: AxisLayout) -> jnp.ndarray:
    """img [H, W, C] -> stacked windows [ny·nx, size_y, size_x, C] (row-major)."""
    return jnp.stack([img[sy:sy + ys.size, sx:sx + xs.size] for sy in ys.starts for sx in xs.starts])


def _stitch(tiles: jnp.ndarray, ys: AxisLayout, xs: AxisLayout, num: int, den: int) -> jnp.ndarray:
    """Crop every tile's core and concatenate the grid. tiles [ny·nx, h_t, w_t, C] are outputs of
    the windows at scale num/den (output px = input px · num / den, exact by construction)
    -> [H·num/den, W·num/den, C]."""
    s = lambda v: v * num // den
    rows = []
    for i, ((cy0, cy1), sy) in enumerate(zip(ys.cores, ys.starts)):
        row = [tiles[i * len(xs.cores) + j, s(cy0 - sy):s(cy1 - sy), s(cx0 - sx):s(cx1 - sx)]
               for j, ((cx0, cx1), sx) in enumerate(zip(xs.cores, xs.starts))]
        rows.append(jnp.concatenate(row, axis=1))
    return jnp.concatenate(rows, axis=0)


def _tiling_clone(vae_module: nn.Module, attention_query_chunk: int) -> nn.Module:
    return vae_module.clone(norm_over_batch=True, attention_query_chunk=attention_query_chunk)


def tiled_encode(vae_module: nn.Module, vae_params, x: jnp.ndarray, *, tile: int = ENCODER_TILE,
                 pad: int = ENCODER_PAD, attention_query_chunk: int = DEFAULT_QUERY_CHUNK
                 ) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Tiled `AutoencoderKL.encode`: x [B, H, W, C] in [-1, 1] -> (mean, logvar), each float32
    [B, H//f, W//f, latent_channels], f = `vae_module.downscale`.

    `vae_params` is the VAE's `params` tree (as for `apply({"params": ...})`). `tile`/`pad` are in
    image pixels and must be multiples of f. One tile (max(H, W) ≤ tile + 2·pad) gives the
    untiled result when H and W are multiples of f (otherwise the < f trailing pixels are cropped,
    module docstring); callers decide with `needs_tiled_encode` whether to call this at all.
    """
    f = vae_module.downscale
    hc, wc = (x.shape[1] // f) * f, (x.shape[2] // f) * f
    if hc == 0 or wc == 0:
        raise ValueError(f"image {x.shape[1]}x{x.shape[2]} is smaller than the VAE factor {f}")
    x = x[:, :hc, :wc]
    ys, xs = axis_layout(hc, tile, pad, f), axis_layout(wc, tile, pad, f)
    module = _tiling_clone(vae_module, attention_query_chunk)

    def one_image(img):
        mean, logvar = module.apply({"params": vae_params}, _extract(img, ys, xs), method="encode")
        return _stitch(mean, ys, xs, 1, f), _stitch(logvar, ys, xs, 1, f)

    return jax.lax.map(one_image, x)


def tiled_decode(vae_module: nn.Module, vae_params, z: jnp.ndarray, *, tile: int = DECODER_TILE,
                 pad: int = DECODER_PAD, attention_query_chunk: int = DEFAULT_QUERY_CHUNK) -> jnp.ndarray:
    """Tiled `AutoencoderKL.decode`: unscaled latents z [B, h, w, latent_channels] -> float32 image
    [B, h·f, w·f, out_channels] (raw decoder output, no clamp).

    `tile`/`pad` are in latent pixels. One tile (max(h, w) ≤ tile + 2·pad) gives the untiled result;
    callers decide with `needs_tiled_decode` whether to call this at all.
    """
    f = vae_module.downscale
    ys, xs = axis_layout(z.shape[1], tile, pad), axis_layout(z.shape[2], tile, pad)
    module = _tiling_clone(vae_module, attention_query_chunk)

    def one_image(lat):
        out = module.apply({"params": vae_params}, _extract(lat, ys, xs), method="decode")
        return _stitch(out, ys, xs, f, 1)

    return jax.lax.map(one_image, z)

