"""Real-ESRGAN second-order degradation as a pure numpy function of (image, rng).

Mirrors the CPU kernel draws of basicsr's `RealESRGANDataset` plus the GPU pipeline of
`RealESRGANModel.feed_data` (blur → resize → noise → JPEG, twice, then final sinc/JPEG in random
order), followed by PASD's resize back to the HQ size and 8-bit rounding (PASD_REFERENCE §8).
Parameters come from the config (`data.degradation`, the values of PASD's `params_realesrgan.yml`).

Split in two so tests can check the drawn ranges without touching pixels:

    params = sample_params(rng, cfg)        # every random choice, incl. kernels and a noise seed
    lq = apply_degradation(hq, params, cfg) # deterministic given params

Images are float32 `[H, W, 3]` RGB in [0, 1]. Deviations from the PyTorch reference (no CPU
torchvision or OpenCV here): resizing uses PIL (area = box filter; bilinear/bicubic antialias when
downsampling, unlike `F.interpolate`), and JPEG uses PIL's encoder instead of basicsr's
`DiffJPEG` (same quality factor). Both change the LQ statistics only marginally.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image
from scipy import signal

from pasd_jax.data import kernels

RESIZE_MODES = ("area", "bilinear", "bicubic")
_PIL_MODES = {"area": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR,
              "bicubic": Image.Resampling.BICUBIC}


def _choice(rng: np.random.Generator, options, probs=None):
    return options[int(rng.choice(len(options), p=None if probs is None else np.asarray(probs) / np.sum(probs)))]


def _sample_resize(rng, probs, up_range, down_range) -> tuple[str, float, str]:
    """(up/down/keep, scale, mode) as in `feed_data`'s random resize."""
    kind = _choice(rng, ("up", "down", "keep"), probs)
    scale = rng.uniform(*up_range) if kind == "up" else rng.uniform(*down_range) if kind == "down" else 1.0
    return kind, float(scale), _choice(rng, RESIZE_MODES)


def _sample_noise(rng, gaussian_prob, sigma_range, poisson_range, gray_prob) -> dict:
    """Gaussian (σ in /255 units) with prob `gaussian_prob`, else Poisson with a scale; gray or colour."""
    gaussian = bool(rng.uniform() < gaussian_prob)
    level = rng.uniform(*sigma_range) if gaussian else rng.uniform(*poisson_range)
    return {"gaussian": gaussian, "level": float(level), "gray": bool(rng.uniform() < gray_prob)}


def sample_params(rng: np.random.Generator, cfg: Mapping[str, Any]) -> dict:
    """Draw every random choice of one degradation (kernels included).

    cfg: `data.degradation` (see `configs/common.py`): `blur1`, `blur2` (kernel settings),
    `final_sinc_prob`, `resize_prob`, `resize_range`, `gaussian_noise_prob`, `noise_range`,
    `poisson_scale_range`, `gray_noise_prob`, `jpeg_range`, `second_blur_prob`, the `*2` variants of
    the second stage, `final_jpeg_range` and `scale`.
    """
    p = {"kernel1": kernels.random_blur_kernel(rng, cfg["blur1"]),
         "kernel2": kernels.random_blur_kernel(rng, cfg["blur2"]),
         "sinc": kernels.random_final_sinc(rng, dict(cfg["blur2"], final_sinc_prob=cfg["final_sinc_prob"]))}
    p["resize1"] = _sample_resize(rng, cfg["resize_prob"], (1.0, cfg["resize_range"][1]),
                                  (cfg["resize_range"][0], 1.0))
    p["noise1"] = _sample_noise(rng, cfg["gaussian_noise_prob"], cfg["noise_range"],
                                cfg["poisson_scale_range"], cfg["gray_noise_prob"])
    p["jpeg1"] = float(rng.uniform(*cfg["jpeg_range"]))
    p["second_blur"] = bool(rng.uniform() < cfg["second_blur_prob"])
    p["resize2"] = _sample_resize(rng, cfg["resize_prob2"], (1.0, cfg["resize_range2"][1]),
                                  (cfg["resize_range2"][0], 1.0))
    p["noise2"] = _sample_noise(rng, cfg["gaussian_noise_prob2"], cfg["noise_range2"],
                                cfg["poisson_scale_range2"], cfg["gray_noise_prob2"])
    p["final_order_resize_first"] = bool(rng.uniform() < 0.5)
    p["final_resize_mode"] = _choice(rng, RESIZE_MODES)
    p["jpeg2"] = float(rng.uniform(*cfg["final_jpeg_range"]))
    p["back_resize_mode"] = _choice(rng, RESIZE_MODES)
    p["noise_seed"] = int(rng.integers(0, 2**31 - 1))
    return p


def filter2d(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate each channel with `kernel` after reflect padding (basicsr `filter2D`). [H, W, C]."""
    k = kernel.shape[0] // 2
    pad = np.pad(img, ((k, k), (k, k), (0, 0)), mode="reflect")
    # fftconvolve convolves; flipping the kernel turns that into torch's correlation.
    out = signal.fftconvolve(pad, kernel[::-1, ::-1, None], mode="valid", axes=(0, 1))
    return out.astype(np.float32)


def resize(img: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """Resize float32 [H, W, C] to (h, w) per channel with PIL (`area` = box filter)."""
    h, w = max(int(size[0]), 1), max(int(size[1]), 1)
    if (h, w) == img.shape[:2]:
        return img
    chans = [np.asarray(Image.fromarray(img[..., c], mode="F").resize((w, h), _PIL_MODES[mode]))
             for c in range(img.shape[-1])]
    return np.stack(chans, axis=-1).astype(np.float32)


def add_noise(img: np.ndarray, noise: Mapping[str, Any], rng: np.random.Generator) -> np.ndarray:
    """Gaussian (`random_add_gaussian_noise_pt`) or Poisson (`random_add_poisson_noise_pt`) noise, clipped."""
    h, w, c = img.shape
    if noise["gaussian"]:
        shape = (h, w, 1) if noise["gray"] else (h, w, c)
        out = img + rng.standard_normal(shape).astype(np.float32) * (noise["level"] / 255.0)
    else:
        src = img.mean(axis=-1, keepdims=True) if noise["gray"] else img
        # basicsr: the number of distinct 8-bit values, rounded up to a power of two, sets the rate.
        levels = np.round(np.clip(src, 0, 1) * 255).astype(np.uint8)
        vals = int(np.count_nonzero(np.bincount(levels.ravel(), minlength=256)))  # = len(np.unique), O(n)
        vals = 2 ** np.ceil(np.log2(max(vals, 2)))
        clean = np.clip(src, 0, 1)
        out = img + (rng.poisson(clean * vals).astype(np.float32) / vals - clean) * noise["level"]
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def jpeg(img: np.ndarray, quality: float) -> np.ndarray:
    """JPEG round-trip at `int(quality)` through PIL (the reference uses DiffJPEG). [H, W, 3] in [0, 1]."""
    u8 = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"), np.float32) / 255.0


def _resize_by(img, kind_scale_mode, base_hw=None):
    _, scale, mode = kind_scale_mode
    h, w = base_hw if base_hw is not None else img.shape[:2]
    return resize(img, (int(h * scale), int(w * scale)), mode)


def apply_degradation(hq: np.ndarray, params: Mapping[str, Any], cfg: Mapping[str, Any]) -> np.ndarray:
    """HQ [H, W, 3] float32 in [0, 1] -> LQ of the same size (the ControlNet input), 8-bit quantised."""
    if hq.ndim != 3 or hq.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {hq.shape}")
    h, w = hq.shape[:2]
    scale = cfg["scale"]
    rng = np.random.default_rng(params["noise_seed"])
    # First degradation.
    x = filter2d(hq, params["kernel1"])
    x = _resize_by(x, params["resize1"])
    x = add_noise(x, params["noise1"], rng)
    x = jpeg(x, params["jpeg1"])
    # Second degradation.
    if params["second_blur"]:
        x = filter2d(x, params["kernel2"])
    x = _resize_by(x, params["resize2"], base_hw=(h / scale, w / scale))
    x = add_noise(x, params["noise2"], rng)
    # Final: [resize to H/s -> sinc -> JPEG] or [JPEG -> resize -> sinc], each with prob 1/2.
    small = (h // scale, w // scale)
    if params["final_order_resize_first"]:
        x = filter2d(resize(x, small, params["final_resize_mode"]), params["sinc"])
        x = jpeg(np.clip(x, 0, 1), params["jpeg2"])
    else:
        x = jpeg(np.clip(x, 0, 1), params["jpeg2"])
        x = filter2d(resize(x, small, params["final_resize_mode"]), params["sinc"])
    # PASD: back to the HQ size, then round to 8 bit.
    x = resize(np.clip(x, 0, 1), (h, w), params["back_resize_mode"])
    return (np.clip(np.round(x * 255.0), 0, 255) / 255.0).astype(np.float32)


def degrade(hq: np.ndarray, rng: np.random.Generator, cfg: Mapping[str, Any]) -> np.ndarray:
    """`apply_degradation(hq, sample_params(rng, cfg), cfg)`."""
    return apply_degradation(hq, sample_params(rng, cfg), cfg)


def to_grayscale_condition(hq: np.ndarray) -> np.ndarray:
    """Colorization condition: ITU-R 601 luma (PIL "L") replicated to 3 channels, 8-bit quantised."""
    luma = hq @ np.asarray([0.299, 0.587, 0.114], np.float32)
    luma = np.round(np.clip(luma, 0, 1) * 255.0) / 255.0
    return np.repeat(luma[..., None], 3, axis=-1).astype(np.float32)
