"""Real-ESRGAN second-order degradation on the accelerator: host draws, jitted batched pixels.

Mirrors the split of Real-ESRGAN's own trainer (`RealESRGANDataset` draws kernels on the CPU,
`RealESRGANModel.feed_data` degrades the batch on the GPU) with the exact stages and draws of the
host path `degrade.py` (`data.degrade_on = "device"`, README "Training"):

    params = sample_params(rng, cfg, (H, W))  # host, per example: degrade.sample_params, packed
    lq = degrade_batch(hq, params, canvas=c)   # device, jittable: [B, H, W, 3] -> [B, H, W, 3]

The host calls `degrade.sample_params` itself, so both paths draw kernels, resize kinds/scales/
modes, noise types/levels/gray flags, JPEG qualities, the final-stage order and the sinc from the
same distributions, with the same rng stream. `pack_params` turns a draw into fixed-shape arrays:

    kernel1, kernel2, sinc   float32 [21, 21]  (kernel2 is a unit pulse when the second blur is off)
    size1, size2             int32 [2]         (h, w) after the first / second random resize
    mode1, mode2, final_mode, back_mode  int32 index into degrade.RESIZE_MODES
    noise{1,2}_gaussian, noise{1,2}_gray, resize_first  int32 0/1
    noise{1,2}_level, jpeg1, jpeg2                     float32
    seed                     int32 (degrade.sample_params' noise seed: device noise keys)

Every intermediate lives on a fixed `Canvas` whose valid region is the top-left (h, w) of the
draw; resizes are products with per-sample separable interpolation matrices built on the device
(`resize_matrix`, PIL's resampling coefficients), so no draw changes a shape and the function
compiles once. Blur is a per-sample depthwise 21×21 correlation after reflect padding of the
valid region (basicsr `filter2D`, as `degrade.filter2d`). Noise is drawn on the device from
`jax.random.key(seed)`: same distributions as the host path, not the same samples. JPEG is the
8×8 DCT quantisation approximation of `device_jpeg.py` (it is on the device because it sits
between device stages: a host JPEG would need two device↔host round trips per batch).
Clamping and 8-bit rounding follow `degrade.apply_degradation`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax.data import degrade
from pasd_jax.data.device_jpeg import jpeg_batch, to_unit

HIGHEST = jax.lax.Precision.HIGHEST
KERNEL_SIZE = 21


@dataclasses.dataclass(frozen=True)
class Canvas:
    """Static (h, w) buffers of the device pipeline: the HQ crop, the largest first-resize output,
    the largest second-resize output and the small (HQ / scale) image."""

    hq: tuple[int, int]
    stage1: tuple[int, int]
    stage2: tuple[int, int]
    small: tuple[int, int]


def _ceil16(n: int) -> int:
    return -(-int(n) // 16) * 16


def canvas_for(hw: tuple[int, int], cfg: Mapping[str, Any]) -> Canvas:
    """The canvas of `data.degradation` cfg for HQ crops of size hw (largest draws of resize_range
    and resize_range2, rounded up to JPEG's 16-pixel MCU)."""
    h, w = int(hw[0]), int(hw[1])
    s, up1, up2 = cfg["scale"], max(1.0, cfg["resize_range"][1]), max(1.0, cfg["resize_range2"][1])
    return Canvas(hq=(h, w), stage1=(_ceil16(h * up1), _ceil16(w * up1)),
                  stage2=(_ceil16(h / s * up2), _ceil16(w / s * up2)), small=(h // s, w // s))


def pack_params(p: Mapping[str, Any], cfg: Mapping[str, Any], hw: tuple[int, int]) -> dict:
    """A `degrade.sample_params` draw -> the fixed-shape numpy arrays of the module doc."""
    h, w = hw
    s = cfg["scale"]
    mode = lambda m: np.int32(degrade.RESIZE_MODES.index(m))  # noqa: E731
    flag = lambda b: np.int32(bool(b))  # noqa: E731
    pulse = np.zeros((KERNEL_SIZE, KERNEL_SIZE), np.float32)
    pulse[KERNEL_SIZE // 2, KERNEL_SIZE // 2] = 1.0
    for key in ("kernel1", "kernel2", "sinc"):
        if p[key].shape != (KERNEL_SIZE, KERNEL_SIZE):
            raise ValueError(f"{key} has shape {p[key].shape}; the device path takes 21×21 kernels")
    # The sizes repeat degrade._resize_by's arithmetic exactly (int of the float product, at least 1).
    s1, s2 = p["resize1"][1], p["resize2"][1]
    out = {"kernel1": p["kernel1"].astype(np.float32),
           "kernel2": (p["kernel2"] if p["second_blur"] else pulse).astype(np.float32),
           "sinc": p["sinc"].astype(np.float32),
           "size1": np.array([max(int(h * s1), 1), max(int(w * s1), 1)], np.int32), "mode1": mode(p["resize1"][2]),
           "size2": np.array([max(int(h / s * s2), 1), max(int(w / s * s2), 1)], np.int32),
           "mode2": mode(p["resize2"][2]),
           "jpeg1": np.float32(int(p["jpeg1"])), "jpeg2": np.float32(int(p["jpeg2"])),
           "resize_first": flag(p["final_order_resize_first"]), "final_mode": mode(p["final_resize_mode"]),
           "back_mode": mode(p["back_resize_mode"]), "seed": np.int32(p["noise_seed"])}
    for i in (1, 2):
        n = p[f"noise{i}"]
        out.update({f"noise{i}_gaussian": flag(n["gaussian"]), f"noise{i}_gray": flag(n["gray"]),
                    f"noise{i}_level": np.float32(n["level"])})
    return out


def sample_params(rng: np.random.Generator, cfg: Mapping[str, Any], hw: tuple[int, int]) -> dict:
    """`pack_params(degrade.sample_params(rng, cfg), cfg, hw)`: the whole host-side cost."""
    return pack_params(degrade.sample_params(rng, cfg), cfg, hw)


# ---- Pixel stages (one sample; `degrade_batch` vmaps them) --------------------------------------

def _pil_filter(x: jnp.ndarray, box: jnp.ndarray, mode: jnp.ndarray) -> jnp.ndarray:
    """PIL's box, triangle and Keys bicubic (a = -0.5) filters at x, selected by mode (the box
    indicator comes in exactly: `box`, see `resize_matrix`)."""
    ax = jnp.abs(x)
    tri = jnp.maximum(1.0 - ax, 0.0)
    a = -0.5
    cubic = jnp.where(ax < 1, ((a + 2) * ax - (a + 3)) * ax * ax + 1,
                      jnp.where(ax < 2, (((ax - 5) * ax + 8) * ax - 4) * a, 0.0))
    return jnp.where(mode == 0, box.astype(jnp.float32), jnp.where(mode == 1, tri, cubic))


def resize_matrix(in_size, out_size, mode, n_out: int, n_in: int) -> jnp.ndarray:
    """[n_out, n_in] float32 matrix of PIL's `precompute_coeffs` (Resample.c) resizing in_size
    samples to out_size (traced ints ≤ n_in, n_out); rows ≥ out_size and columns ≥ in_size are 0.

    PIL works in double precision; here every tap position is an exact integer ratio instead
    (2·out·(j + ½ − centre_i) = (2j+1)·out − (2i+1)·in), so the window bounds and the box
    filter's half-open edge (-½, ½] are decided exactly rather than by float32 rounding. Only
    the box ("area") has weight at such ties; there PIL's own double rounding picks the other
    side in about 1 tie in 9 (random sizes), i.e. a row averages one source pixel more or less.
    Triangle and bicubic weights are continuous and 0 at their support edges: those match PIL to
    float32 rounding.
    """
    n_in_, n_out_ = jnp.asarray(in_size, jnp.int32), jnp.asarray(out_size, jnp.int32)
    i = jnp.arange(n_out, dtype=jnp.int32)[:, None]
    j = jnp.arange(n_in, dtype=jnp.int32)[None, :]
    half = jnp.where(n_in_ > n_out_, n_in_, n_out_)  # out · max(in/out, 1): the filter's scale × out
    num = (2 * j + 1) * n_out_ - (2 * i + 1) * n_in_  # 2·out·(j + ½ − centre)
    support = jnp.asarray((1, 2, 4), jnp.int32)[mode] * half  # 2·out·support
    lo = jnp.maximum(jnp.floor_divide((2 * i + 1) * n_in_ - support + n_out_, 2 * n_out_), 0)
    hi = jnp.minimum(jnp.floor_divide((2 * i + 1) * n_in_ + support + n_out_, 2 * n_out_), n_in_)
    box = (num > -half) & (num <= half)  # -½ < x ≤ ½
    wts = _pil_filter(num.astype(jnp.float32) / (2 * half).astype(jnp.float32), box, mode) * ((j >= lo) & (j < hi))
    total = wts.sum(axis=1, keepdims=True)
    wts = jnp.where(total != 0, wts / jnp.where(total != 0, total, 1.0), 0.0)
    return wts * (i < n_out_)


def resize(x: jnp.ndarray, in_hw, out_hw, mode, out_canvas: tuple[int, int]) -> jnp.ndarray:
    """[Hc, Wc, C] with valid region in_hw -> [*out_canvas, C] with valid region out_hw (PIL
    resampling of `degrade.resize`, zeros outside the region)."""
    mh = resize_matrix(in_hw[0], out_hw[0], mode, out_canvas[0], x.shape[0])
    mw = resize_matrix(in_hw[1], out_hw[1], mode, out_canvas[1], x.shape[1])
    return jnp.einsum("oh,hwc,pw->opc", mh, x, mw, precision=HIGHEST)


def _reflect_index(n_canvas: int, pad: int, n) -> jnp.ndarray:
    """Source rows of positions -pad … n_canvas+pad-1 under numpy/torch "reflect" about a valid
    length n (repeated reflection when pad ≥ n, as np.pad does)."""
    r = jnp.arange(-pad, n_canvas + pad)
    period = jnp.maximum(2 * (n - 1), 1)
    m = jnp.mod(r, period)
    return jnp.where(n > 1, jnp.where(m < n, m, period - m), 0)


def blur(x: jnp.ndarray, kernel: jnp.ndarray, hw) -> jnp.ndarray:
    """Depthwise correlation of [Hc, Wc, C] with kernel [k, k] after reflect padding of the valid
    region hw (basicsr `filter2D`, `degrade.filter2d`). Same shape out."""
    k, c = kernel.shape[0], x.shape[-1]
    rows = _reflect_index(x.shape[0], k // 2, hw[0])
    cols = _reflect_index(x.shape[1], k // 2, hw[1])
    padded = jnp.take(jnp.take(x, rows, axis=0, mode="clip"), cols, axis=1, mode="clip")
    rhs = jnp.broadcast_to(kernel[:, :, None, None], (k, k, 1, c))
    out = jax.lax.conv_general_dilated(padded[None], rhs, (1, 1), "VALID", feature_group_count=c,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
    return out[0]


def add_noise(x: jnp.ndarray, gaussian, level, gray, hw, key: jax.Array) -> jnp.ndarray:
    """Gaussian (σ = level/255) or Poisson (scale = level) noise, gray or colour, clipped to [0, 1]
    (`degrade.add_noise`; both are drawn, the flag selects). The Poisson rate counts the distinct
    8-bit levels of the valid region hw only."""
    k_gauss, k_pois = jax.random.split(key)
    gray = gray > 0
    g = jax.random.normal(k_gauss, x.shape, jnp.float32)
    noisy_g = x + jnp.where(gray, g[..., :1], g) * (level / 255.0)
    src = jnp.where(gray, x.mean(axis=-1, keepdims=True), x)
    clean = jnp.clip(src, 0.0, 1.0)
    valid = (jnp.arange(x.shape[0])[:, None, None] < hw[0]) & (jnp.arange(x.shape[1])[None, :, None] < hw[1])
    levels = jnp.round(clean * 255.0).astype(jnp.int32)
    hist = jnp.zeros(256, jnp.float32).at[levels.ravel()].add(jnp.broadcast_to(valid, x.shape).ravel())
    vals = jnp.exp2(jnp.ceil(jnp.log2(jnp.maximum(jnp.sum(hist > 0), 2).astype(jnp.float32))))
    pois = jax.random.poisson(k_pois, clean * vals, x.shape).astype(jnp.float32)
    noisy_p = x + (jnp.where(gray, pois[..., :1], pois) / vals - clean) * level
    return jnp.clip(jnp.where(gaussian > 0, noisy_g, noisy_p), 0.0, 1.0)


def _jpeg(x: jnp.ndarray, quality, hw) -> jnp.ndarray:
    return jpeg_batch(x[None], quality[None], jnp.asarray(hw, jnp.int32)[None])[0]


def degrade_one(hq: jnp.ndarray, p: Mapping[str, jnp.ndarray], canvas: Canvas) -> jnp.ndarray:
    """One HQ [H, W, 3] in [0, 1] -> LQ [H, W, 3] on the 8-bit grid (`degrade.apply_degradation`)."""
    full = jnp.asarray(canvas.hq, jnp.int32)
    small = jnp.asarray(canvas.small, jnp.int32)
    key1, key2 = jax.random.split(jax.random.key(p["seed"].astype(jnp.uint32)))
    # First degradation: blur, random resize, noise, JPEG.
    x = blur(hq, p["kernel1"], full)
    x = resize(x, full, p["size1"], p["mode1"], canvas.stage1)
    x = add_noise(x, p["noise1_gaussian"], p["noise1_level"], p["noise1_gray"], p["size1"], key1)
    x = _jpeg(x, p["jpeg1"], p["size1"])
    # Second degradation: optional blur (kernel2 is a pulse when off), resize relative to H/scale, noise.
    x = blur(x, p["kernel2"], p["size1"])
    x = resize(x, p["size1"], p["size2"], p["mode2"], canvas.stage2)
    x = add_noise(x, p["noise2_gaussian"], p["noise2_level"], p["noise2_gray"], p["size2"], key2)
    # Final stage in either order; both are computed (small buffers), the flag selects.
    a = blur(resize(x, p["size2"], small, p["final_mode"], canvas.small), p["sinc"], small)
    a = _jpeg(jnp.clip(a, 0.0, 1.0), p["jpeg2"], small)
    b = _jpeg(jnp.clip(x, 0.0, 1.0), p["jpeg2"], p["size2"])
    b = blur(resize(b, p["size2"], small, p["final_mode"], canvas.small), p["sinc"], small)
    x = jnp.where(p["resize_first"] > 0, a, b)
    # PASD: back to the HQ size, 8-bit rounding.
    x = resize(jnp.clip(x, 0.0, 1.0), small, full, p["back_mode"], canvas.hq)
    return to_unit(x * 255.0)


def degrade_batch(hq: jnp.ndarray, params: Mapping[str, jnp.ndarray], *, canvas: Canvas) -> jnp.ndarray:
    """Batched `degrade_one`: hq float32 [B, H, W, 3] in [0, 1], params of `pack_params` stacked
    to [B, …] -> LQ float32 [B, H, W, 3]. Jittable; shapes depend only on `canvas`."""
    if tuple(hq.shape[1:3]) != canvas.hq:
        raise ValueError(f"HQ batch {hq.shape} does not match the canvas {canvas.hq}")
    return jax.vmap(lambda x, p: degrade_one(x, p, canvas))(hq.astype(jnp.float32), dict(params))
