"""Colour correction of the SR output against the LQ input, in JAX (PASD_REFERENCE §7.7).

Mirrors PASD's `myutils/wavelet_color_fix.py` (taken from StableSR):

* `wavelet_color_fix(sr, lq)`: keep the high frequencies of the SR image and take the low
  frequencies (colour, tone) from the LQ image. A 5-level "à trous" decomposition: at level
  r ∈ {1, 2, 4, 8, 16} the image is replicate-padded by r and blurred with the depthwise 3×3 kernel
  `[[1,2,1],[2,4,2],[1,2,1]] / 16` at dilation r; `high += cur − low; cur = low`.
  Result `high(sr) + low(lq)` clamped to [0, 1].
* `adain_color_fix(sr, lq)`: per image and channel, `(sr − μ_sr) / σ_sr · σ_lq + μ_lq` with the
  **unbiased** variance over H·W and `σ = sqrt(var + 1e-5)`, clamped to [0, 1].

All functions are pure and jit-able; images are float32 NHWC `[B, H, W, C]` (or `[H, W, C]`) in
[0, 1], sr and lq of the same shape. The reference converts the result to 8 bit by truncating
`x·255` (torchvision `ToPILImage`, §9.13): `to_uint8_truncate`; the plain pipeline output
(diffusers `numpy_to_pil`) rounds: `to_uint8_round`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: Dilations of the five wavelet levels (2**i, i = 0..4).
WAVELET_RADII = (1, 2, 4, 8, 16)


def _as_nhwc(x: jnp.ndarray) -> tuple[jnp.ndarray, bool]:
    """Add a batch axis to [H, W, C]; returns (x [B, H, W, C], whether one was added)."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim == 3:
        return x[None], True
    if x.ndim != 4:
        raise ValueError(f"expected [B, H, W, C] or [H, W, C], got shape {x.shape}")
    return x, False


def _check_pair(sr_shape: tuple, lq_shape: tuple) -> None:
    if tuple(sr_shape) != tuple(lq_shape):
        raise ValueError(f"sr and lq must have the same shape, got {sr_shape} and {lq_shape}")


def wavelet_blur(x: jnp.ndarray, radius: int) -> jnp.ndarray:
    """Replicate-pad by `radius`, then depthwise 3×3 binomial blur with dilation `radius`.

    Mirrors `wavelet_blur` (`F.pad(mode="replicate")` + `F.conv2d(groups=C, dilation=r)`). The
    kernel is the outer product of [1, 2, 1]/4 with itself, so it runs as two passes of shifted
    adds: same result to float rounding, and far faster than XLA's dilated depthwise convolution
    on CPU (minutes → a second for a 4096² image).
    x: float32 [B, H, W, C] → same shape. Works for any H, W (edge padding may exceed the size).
    """
    h, w = x.shape[1:3]
    r = radius
    xp = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
    rows = (xp[:, :h] + 2 * xp[:, r:r + h] + xp[:, 2 * r:2 * r + h]) * 0.25
    return (rows[:, :, :w] + 2 * rows[:, :, r:r + w] + rows[:, :, 2 * r:2 * r + w]) * 0.25


def wavelet_decomposition(x: jnp.ndarray, levels: int = 5) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(Σ high-frequency bands, final low-frequency residual) of x [B, H, W, C].

    Mirrors `wavelet_decomposition`: dilation 2**i at level i; high accumulated from zeros in level
    order, as the reference does (float summation order kept).
    """
    high = jnp.zeros_like(x)
    for i in range(levels):
        low = wavelet_blur(x, 2 ** i)
        high = high + (x - low)
        x = low
    return high, x


def wavelet_color_fix(sr: jnp.ndarray, lq: jnp.ndarray) -> jnp.ndarray:
    """`clip(high(sr) + low(lq), 0, 1)`: mirrors `wavelet_reconstruction` + the clamp of
    `wavelet_color_fix`. sr, lq: float32 [B, H, W, C] or [H, W, C] in [0, 1]; returns sr's shape."""
    _check_pair(jnp.shape(sr), jnp.shape(lq))
    (sr, squeeze), (lq, _) = _as_nhwc(sr), _as_nhwc(lq)
    sr_high, _ = wavelet_decomposition(sr)
    _, lq_low = wavelet_decomposition(lq)
    out = jnp.clip(sr_high + lq_low, 0.0, 1.0)
    return out[0] if squeeze else out


def _mean_std(x: jnp.ndarray, eps: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per (image, channel) mean and sqrt(unbiased var + eps) over H, W: mirrors `calc_mean_std`."""
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.var(x, axis=(1, 2), keepdims=True, ddof=1)
    return mean, jnp.sqrt(var + eps)


def adain_color_fix(sr: jnp.ndarray, lq: jnp.ndarray, eps: float = 1e-5) -> jnp.ndarray:
    """AdaIN colour transfer, clamped: mirrors `adain_color_fix` / `adaptive_instance_normalization`.

    sr, lq: float32 [B, H, W, C] or [H, W, C] in [0, 1] (H·W ≥ 2 for the unbiased variance).
    """
    _check_pair(jnp.shape(sr), jnp.shape(lq))
    (sr, squeeze), (lq, _) = _as_nhwc(sr), _as_nhwc(lq)
    sr_mean, sr_std = _mean_std(sr, eps)
    lq_mean, lq_std = _mean_std(lq, eps)
    out = jnp.clip((sr - sr_mean) / sr_std * lq_std + lq_mean, 0.0, 1.0)
    return out[0] if squeeze else out


def to_uint8_truncate(x: jnp.ndarray) -> jnp.ndarray:
    """float [0, 1] → uint8 as torchvision `ToPILImage`: `(x·255)` cast, i.e. truncated (§9.13).

    Clips to [0, 1] first (a no-op after the colour fixes, which already clamp).
    """
    return (jnp.clip(x, 0.0, 1.0) * jnp.float32(255.0)).astype(jnp.uint8)


def to_uint8_round(x: jnp.ndarray) -> jnp.ndarray:
    """float [0, 1] → uint8 as diffusers `numpy_to_pil`: `round(x·255)` (half to even), clipped."""
    return jnp.round(jnp.clip(x, 0.0, 1.0) * jnp.float32(255.0)).astype(jnp.uint8)


def adaptive_instance_normalization(content: jnp.ndarray, style: jnp.ndarray, eps: float = 1e-5) -> jnp.ndarray:
    """Unclamped AdaIN of StableSR's `scripts/wavelet_color_fix.py` (used on [−1, 1] tensors before
    the final clamp, STABLESR_REFERENCE §8.6): `(c − μ_c)/σ_c · σ_s + μ_s`, unbiased variance + eps.
    content, style: float32 [B, H, W, C] (same batch and channels; sizes may differ)."""
    c_mean, c_std = _mean_std(jnp.asarray(content, jnp.float32), eps)
    s_mean, s_std = _mean_std(jnp.asarray(style, jnp.float32), eps)
    return (content - c_mean) / c_std * s_std + s_mean


def wavelet_reconstruction(content: jnp.ndarray, style: jnp.ndarray) -> jnp.ndarray:
    """Unclamped `high(content) + low(style)` (StableSR's `wavelet_reconstruction`, §8.6).
    content, style: float32 [B, H, W, C] of the same shape."""
    _check_pair(jnp.shape(content), jnp.shape(style))
    high, _ = wavelet_decomposition(jnp.asarray(content, jnp.float32))
    _, low = wavelet_decomposition(jnp.asarray(style, jnp.float32))
    return high + low
