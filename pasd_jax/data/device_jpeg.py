"""JPEG round trip approximated on the device: 8×8 DCT quantisation, jittable and batched.

Mirrors what basicsr's `DiffJPEG` (the JPEG of Real-ESRGAN's GPU degradation, and therefore of
PASD's reference) does, written to follow the libjpeg encoder/decoder that PIL runs on the host
path (`degrade.jpeg`) as closely as float arithmetic allows:

    RGB u8 -> YCbCr (JFIF full range, rounded) -> 4:2:0 chroma (2×2 mean, PIL's default subsampling)
    -> level shift -128 -> orthonormal 8×8 DCT -> round(c / Q) · Q with the Annex K tables scaled by
    libjpeg's quality rule (`jpeg_quality_scaling`, baseline-clipped to [1, 255])
    -> inverse DCT -> +128, round, clip -> chroma "fancy" (triangle, 9-3-3-1) upsampling as in
    libjpeg's `h2v2_fancy_upsample` -> RGB, round, clip -> [0, 1].

Differences from PIL: float DCT instead of libjpeg's scaled-integer `JDCT_ISLOW`, rounded means
instead of libjpeg's alternating-bias chroma downsampling, and no entropy coding (lossless, so it
does not matter). `tests/data/device_degrade_test.py` checks PSNR against PIL at several
qualities. An image whose valid region is smaller than its canvas is edge-replicated to the
canvas first (libjpeg also replicates edge pixels to fill partial MCUs), so pixels inside the
valid region see what libjpeg's padding gives them.

Shapes: images float32 `[B, H, W, 3]` in [0, 1], qualities float32 `[B]` (integer-valued, ≥ 1).
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

HIGHEST = jax.lax.Precision.HIGHEST

# ITU-T T.81 Annex K tables, row = vertical frequency (natural order, not zig-zag).
LUMA_TABLE = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], np.float32)
CHROMA_TABLE = np.full((8, 8), 99, np.float32)
CHROMA_TABLE[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]

_RGB_TO_YCC = np.array([[0.299, 0.587, 0.114], [-0.168735892, -0.331264108, 0.5],
                        [0.5, -0.418687589, -0.081312411]], np.float32)
_YCC_TO_RGB = np.array([[1.0, 0.0, 1.402], [1.0, -0.344136286, -0.714136286], [1.0, 1.772, 0.0]], np.float32)


def dct_matrix(n: int = 8) -> np.ndarray:
    """Orthonormal DCT-II matrix D [n, n] (D[u, x]); coefficients of a block b are D·b·Dᵀ."""
    x, u = np.meshgrid(np.arange(n), np.arange(n))
    d = np.cos((2 * x + 1) * u * np.pi / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d.astype(np.float32)


def quant_tables(quality: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """libjpeg `jpeg_set_quality(q, force_baseline=TRUE)`: ([B, 8, 8] luma, [B, 8, 8] chroma)."""
    q = jnp.clip(jnp.floor(quality), 1, 100)[:, None, None]
    scale = jnp.where(q < 50, 5000.0 / q, 200.0 - 2.0 * q)
    table = lambda base: jnp.clip(jnp.floor((base * scale + 50.0) / 100.0), 1, 255)  # noqa: E731
    return table(jnp.asarray(LUMA_TABLE)), table(jnp.asarray(CHROMA_TABLE))


def _round_half_away(x):
    """libjpeg's quantiser rounds halves away from zero (jnp.round rounds them to even)."""
    return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def _quantise_planes(plane: jnp.ndarray, table: jnp.ndarray) -> jnp.ndarray:
    """[B, H, W] level-shifted samples (H, W multiples of 8) -> DCT-quantised reconstruction."""
    b, h, w = plane.shape
    d = jnp.asarray(dct_matrix())
    blocks = plane.reshape(b, h // 8, 8, w // 8, 8)
    coef = jnp.einsum("ux,bixjy,vy->biujv", d, blocks, d, precision=HIGHEST)
    coef = _round_half_away(coef / table[:, None, :, None, :]) * table[:, None, :, None, :]
    rec = jnp.einsum("ux,biujv,vy->bixjy", d, coef, d, precision=HIGHEST)
    return rec.reshape(b, h, w)


def _fancy_up(x: jnp.ndarray, axis: int) -> jnp.ndarray:
    """×2 triangle upsampling along `axis` (3/4 nearer + 1/4 farther sample, edges replicated)."""
    n = x.shape[axis]
    prev = jnp.concatenate([jax.lax.slice_in_dim(x, 0, 1, axis=axis), jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis)
    nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis), jax.lax.slice_in_dim(x, n - 1, n, axis=axis)], axis)
    even, odd = 0.75 * x + 0.25 * prev, 0.75 * x + 0.25 * nxt
    out = jnp.stack([even, odd], axis=axis + 1)
    shape = list(x.shape)
    shape[axis] = 2 * n
    return out.reshape(shape)


def edge_pad_to(x: jnp.ndarray, valid_hw: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
    """[B, H, W, C] whose valid region is the top-left valid_hw [B, 2] -> [B, *size, C] with every
    pixel outside the region a copy of the nearest edge pixel of the region."""
    def one(img, hw):
        rows = jnp.minimum(jnp.arange(size[0]), hw[0] - 1)
        cols = jnp.minimum(jnp.arange(size[1]), hw[1] - 1)
        return jnp.take(jnp.take(img, rows, axis=0, mode="clip"), cols, axis=1, mode="clip")
    return jax.vmap(one)(x, valid_hw)


def jpeg_batch(x: jnp.ndarray, quality: jnp.ndarray, valid_hw: jnp.ndarray | None = None) -> jnp.ndarray:
    """JPEG round trip of each image at its quality (see module doc). [B, H, W, 3] -> same shape,
    values on the 8-bit grid in [0, 1]; `valid_hw` [B, 2] int (default: the whole canvas)."""
    b, h, w, _ = x.shape
    ph, pw = -(-h // 16) * 16, -(-w // 16) * 16
    if valid_hw is None:
        valid_hw = jnp.tile(jnp.asarray([[h, w]], jnp.int32), (b, 1))
    x = edge_pad_to(x, valid_hw, (ph, pw))
    u8 = jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0)
    ycc = jnp.einsum("bhwc,kc->bhwk", u8, jnp.asarray(_RGB_TO_YCC), precision=HIGHEST)
    ycc = jnp.clip(jnp.round(ycc + jnp.asarray([0.0, 128.0, 128.0])), 0, 255)
    luma_q, chroma_q = quant_tables(quality)
    y = _quantise_planes(ycc[..., 0] - 128.0, luma_q) + 128.0
    chroma = ycc[..., 1:].reshape(b, ph // 2, 2, pw // 2, 2, 2).mean(axis=(2, 4))
    chroma = jnp.round(chroma) - 128.0
    cb = _quantise_planes(chroma[..., 0], chroma_q)
    cr = _quantise_planes(chroma[..., 1], chroma_q)
    y = jnp.clip(jnp.round(y), 0, 255)
    c = jnp.clip(jnp.round(jnp.stack([cb, cr], axis=-1) + 128.0), 0, 255)
    c = _fancy_up(_fancy_up(c, axis=1), axis=2) - 128.0  # vertical then horizontal, as libjpeg
    rgb = jnp.einsum("bhwk,ck->bhwc", jnp.concatenate([y[..., None], c], axis=-1), jnp.asarray(_YCC_TO_RGB),
                     precision=HIGHEST)
    return to_unit(rgb)[:, :h, :w]


def to_unit(levels: jnp.ndarray) -> jnp.ndarray:
    """round(clip(levels, 0, 255)) / 255 exactly as numpy computes it (a table lookup: XLA turns a
    division by a constant into a multiplication, which is 1 ulp off for some levels)."""
    table = jnp.asarray(np.arange(256, dtype=np.float32) / np.float32(255.0))
    return table[jnp.clip(jnp.round(levels), 0, 255).astype(jnp.int32)]
