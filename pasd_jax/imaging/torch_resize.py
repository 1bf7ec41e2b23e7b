"""PyTorch-exact `F.interpolate(mode="bicubic", align_corners=False)` and the pads StableSR uses.

`jax.image.resize("bicubic")` uses Keys a = −0.5 and antialiases when shrinking; torch uses
a = −0.75, no antialiasing, source index `(dst + 0.5)·in/out − 0.5` and taps clamped to the
border (STABLESR_REFERENCE §11). Implemented as two dense interpolation matrices (numpy, float32
coefficients as torch's CPU kernel) applied along H and W: exact to float rounding, host side.
Images are NHWC float32.
"""

from __future__ import annotations

import numpy as np

_A = -0.75


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Keys cubic convolution weights [..., 4] for the taps at offsets −1, 0, 1, 2."""
    def near(x):  # |x| <= 1
        return ((_A + 2) * x - (_A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float32 matrix of torch's bicubic resampling along one axis (size given)."""
    scale = np.float32(n_in / n_out)
    dst = np.arange(n_out, dtype=np.float32)
    real = scale * (dst + np.float32(0.5)) - np.float32(0.5)
    base = np.floor(real)
    t = (real - base).astype(np.float32)
    w = _cubic_weights(t).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    for k in range(4):
        idx = np.clip(base.astype(np.int64) - 1 + k, 0, n_in - 1)
        np.add.at(m, (np.arange(n_out), idx), w[:, k])
    return m


def resize_bicubic(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """x [B, H, W, C] float32 -> [B, size[0], size[1], C], as torch bicubic (align_corners=False)."""
    x = np.asarray(x, np.float32)
    my, mx = bicubic_matrix(x.shape[1], size[0]), bicubic_matrix(x.shape[2], size[1])
    y = np.einsum("oh,bhwc->bowc", my, x)
    return np.einsum("pw,bowc->bopc", mx, y).astype(np.float32)


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
    """`(int(h·s), int(w·s))` in Python float (float64) arithmetic, truncated."""
    return int(h * scale), int(w * scale)


def reflect_pad_to_32(x: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """The `_tile` script's padding (quirk §10.3): when H or W is not a multiple of 32, reflect-pad
    bottom/right by `(n//32+1)·32 − n` on **both** axes (an aligned axis gets 32 more). x NHWC.
    Returns (padded, (pad_h, pad_w))."""
    h, w = x.shape[1:3]
    if h % 32 == 0 and w % 32 == 0:
        return x, (0, 0)
    pad_h, pad_w = (h // 32 + 1) * 32 - h, (w // 32 + 1) * 32 - w
    if pad_h >= h or pad_w >= w:
        raise ValueError(f"image {h}x{w} is too small for the reference's reflect padding (+{pad_h}, +{pad_w})")
    return np.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="reflect"), (pad_h, pad_w)


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float32 matrix of torch bilinear (align_corners=False, no antialias) on one axis."""
    scale = np.float32(n_in / n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (src - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), np.float32)
    np.add.at(m, (np.arange(n_out), i0), 1 - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return m


def resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """x [B, H, W, C] -> [B, size[0], size[1], C] as torch/torchvision tensor bilinear without antialias."""
    x = np.asarray(x, np.float32)
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    my, mx = bilinear_matrix(x.shape[1], size[0]), bilinear_matrix(x.shape[2], size[1])
    return np.einsum("pw,bowc->bopc", mx, np.einsum("oh,bhwc->bowc", my, x)).astype(np.float32)
