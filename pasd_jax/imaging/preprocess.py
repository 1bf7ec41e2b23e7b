"""Input pre-processing and output post-processing of PASD's `test_pasd.py` (host side, PIL + numpy).

Realisr mode (PASD_REFERENCE §7.2 steps 2–4, §7.7 last step):

1. `img.resize((w·upscale, h·upscale))` — PIL bicubic (PIL's default filter for RGB);
2. if `min(side) < process_size`: torchvision `Resize(process_size)` (bilinear) on the PIL image:
   shorter side → process_size, longer → `int(process_size·long/short)`;
3. `img.resize((w//8·8, h//8·8))` — PIL bicubic (skipped when already a multiple of 8; PIL would
   only copy);
4. after sampling and the colour fix, the result is resized (PIL bicubic) to
   `(orig_w·upscale, orig_h·upscale)`.

Colorization mode (§7.8): the input is always `Resize(process_size, max_size=2·process_size)`
(bilinear), then cut to multiples of 8; the output's chroma (BT.601 YUV, OpenCV conventions) is
merged with the luma of the original grayscale image at the original size.

Sizes in `PreprocessInfo` are PIL-style `(width, height)`; arrays are `[H, W, 3]`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class PreprocessInfo:
    """Sizes (W, H) along the pre-processing chain; `target_size` is what the output is resized to."""

    orig_size: tuple[int, int]
    upscale: int
    target_size: tuple[int, int]     # (orig_w·upscale, orig_h·upscale)
    resized_size: tuple[int, int]    # after the upscale and process_size resizes
    processed_size: tuple[int, int]  # after rounding down to multiples of 8: the model's input


def torchvision_resize_size(width: int, height: int, size: int,
                            max_size: Optional[int] = None) -> tuple[int, int]:
    """(W, H) that torchvision `Resize(size, max_size=max_size)` produces for an int `size`.

    Mirrors `torchvision.transforms.functional._compute_resized_output_size` (Python float maths,
    truncating `int()`), so e.g. 300×500 with size 768 → 768×1280.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    if max_size is not None:
        if max_size <= size:
            raise ValueError(f"max_size ({max_size}) must be larger than size ({size})")
        if new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected uint8 [H, W, 3] RGB, got {rgb.dtype} {rgb.shape}")
    return rgb


def _floor_to_multiple_of_8(img: Image.Image) -> Image.Image:
    """§7.2 step 4: PIL bicubic resize to (w//8·8, h//8·8); no-op when already multiples of 8."""
    w, h = img.size
    if w < 8 or h < 8:
        raise ValueError(f"image {w}x{h} is smaller than 8 px on a side after resizing")
    if w % 8 == 0 and h % 8 == 0:
        return img
    return img.resize((w // 8 * 8, h // 8 * 8), Image.BICUBIC)


def _to_unit_float(img: Image.Image) -> np.ndarray:
    """PIL RGB → float32 [H, W, 3] in [0, 1] (x / 255, as diffusers' image processor)."""
    return np.asarray(img, dtype=np.float32) / np.float32(255.0)


def prepare_input(rgb: np.ndarray, *, upscale: int = 1,
                  process_size: int = 768) -> tuple[np.ndarray, PreprocessInfo]:
    """Realisr pre-processing (§7.2 steps 2–4): uint8 [H, W, 3] → (lq float32 [H', W', 3] in [0, 1], info).

    H', W' are multiples of 8 and `min(H', W') ≥ process_size` rounded down to a multiple of 8.
    """
    rgb = _check_rgb(rgb)
    if int(upscale) != upscale or upscale < 1:
        raise ValueError(f"upscale must be a positive integer, got {upscale}")
    if process_size < 8:
        raise ValueError(f"process_size must be at least 8, got {process_size}")
    upscale = int(upscale)
    img = Image.fromarray(rgb)
    orig_w, orig_h = img.size
    if upscale != 1:
        img = img.resize((orig_w * upscale, orig_h * upscale), Image.BICUBIC)
    if min(img.size) < process_size:
        img = img.resize(torchvision_resize_size(*img.size, process_size), Image.BILINEAR)
    resized_size = img.size
    img = _floor_to_multiple_of_8(img)
    info = PreprocessInfo(orig_size=(orig_w, orig_h), upscale=upscale,
                          target_size=(orig_w * upscale, orig_h * upscale),
                          resized_size=resized_size, processed_size=img.size)
    return _to_unit_float(img), info


def float_to_uint8(x: np.ndarray, *, rounding: str = "round") -> np.ndarray:
    """float [0, 1] → uint8 after clipping: "round" = diffusers `numpy_to_pil` (half to even),
    "truncate" = torchvision `ToPILImage` (`x·255` cast, as after PASD's wavelet fix, §9.13)."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0) * np.float32(255.0)
    if rounding == "round":
        return np.round(x).astype(np.uint8)
    if rounding == "truncate":
        return x.astype(np.uint8)
    raise ValueError(f"rounding must be 'round' or 'truncate', got {rounding!r}")


def finalize_output(sr: np.ndarray, info: PreprocessInfo, *, rounding: str = "round") -> np.ndarray:
    """Resize the model output to `info.target_size` with PIL bicubic (§7.7 last step).

    sr: uint8 [H, W, 3], or float [H, W, 3] in [0, 1] converted with `float_to_uint8(rounding=…)`.
    Returns uint8 [orig_h·upscale, orig_w·upscale, 3].
    """
    sr = np.asarray(sr)
    if sr.ndim != 3 or sr.shape[-1] != 3:
        raise ValueError(f"expected [H, W, 3], got {sr.shape}")
    if sr.dtype != np.uint8:
        if not np.issubdtype(sr.dtype, np.floating):
            raise ValueError(f"expected uint8 or float, got {sr.dtype}")
        sr = float_to_uint8(sr, rounding=rounding)
    img = Image.fromarray(np.ascontiguousarray(sr))
    if img.size != info.target_size:
        img = img.resize(info.target_size, Image.BICUBIC)
    return np.array(img, dtype=np.uint8)


# ----------------------------------------------------------------------------- colorization (§7.8)

def to_gray(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] → uint8 [H, W] with PIL `convert("L")` (ITU-R 601-2 luma); [H, W] passes."""
    rgb = np.asarray(rgb)
    if rgb.ndim == 2 and rgb.dtype == np.uint8:
        return rgb
    return np.array(Image.fromarray(_check_rgb(rgb)).convert("L"))


def prepare_grayscale_input(image: np.ndarray, *,
                            process_size: int = 768) -> tuple[np.ndarray, PreprocessInfo]:
    """Colorization pre-processing: gray → RGB, `Resize(ps, max_size=2·ps)` bilinear, multiples of 8.

    image: uint8 [H, W] or [H, W, 3] (reduced to luma first). Returns (lq float32 [H', W', 3] in
    [0, 1] with equal channels, info) with `upscale = 1` (the reference forces it). Keep the
    original gray image for `merge_chroma`.
    """
    if process_size < 8:
        raise ValueError(f"process_size must be at least 8, got {process_size}")
    img = Image.fromarray(to_gray(image)).convert("RGB")
    orig_w, orig_h = img.size
    img = img.resize(torchvision_resize_size(orig_w, orig_h, process_size, max_size=2 * process_size),
                     Image.BILINEAR)
    resized_size = img.size
    img = _floor_to_multiple_of_8(img)
    info = PreprocessInfo(orig_size=(orig_w, orig_h), upscale=1, target_size=(orig_w, orig_h),
                          resized_size=resized_size, processed_size=img.size)
    return _to_unit_float(img), info


# BT.601 YUV with OpenCV's `COLOR_BGR2YUV` / `COLOR_YUV2BGR` constants (imgproc color_yuv):
#   Y = 0.299 R + 0.587 G + 0.114 B
#   U = 0.492 (B − Y) + 128          V = 0.877 (R − Y) + 128
#   R = Y + 1.140 (V − 128)          B = Y + 2.032 (U − 128)
#   G = Y − 0.395 (U − 128) − 0.581 (V − 128)
# Every 8-bit stage is rounded (half up) and saturated to [0, 255] as OpenCV stores it; OpenCV's 14-bit
# fixed-point arithmetic can differ from this float version by ±1.
_Y_RGB = (0.299, 0.587, 0.114)
_U_B, _V_R = 0.492, 0.877
_R_V, _G_U, _G_V, _B_U = 1.140, -0.395, -0.581, 2.032


def _sat_u8(x: np.ndarray) -> np.ndarray:
    """Round half up and saturate to uint8, as OpenCV's fixed-point `CV_DESCALE` 8-bit paths do."""
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def rgb_to_yuv(rgb: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] RGB → uint8 [H, W, 3] (Y, U, V), as OpenCV `COLOR_BGR2YUV` on the BGR image."""
    r, g, b = (np.asarray(rgb, dtype=np.float64)[..., i] for i in range(3))
    y = _Y_RGB[0] * r + _Y_RGB[1] * g + _Y_RGB[2] * b
    return np.stack([_sat_u8(y), _sat_u8(_U_B * (b - y) + 128.0), _sat_u8(_V_R * (r - y) + 128.0)], -1)


def yuv_to_rgb(yuv: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] (Y, U, V) → uint8 RGB, as OpenCV `COLOR_YUV2BGR` (then BGR → RGB)."""
    y, u, v = (np.asarray(yuv, dtype=np.float64)[..., i] for i in range(3))
    u, v = u - 128.0, v - 128.0
    return np.stack([_sat_u8(y + _R_V * v), _sat_u8(y + _G_U * u + _G_V * v), _sat_u8(y + _B_U * u)], -1)


def _bilinear_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV INTER_LINEAR sampling along one axis: half-pixel centres, edge clamp, no antialias."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    i0 = np.floor(src)
    frac = src - i0
    i0 = i0.astype(np.int64)
    i1 = np.clip(i0 + 1, 0, n_in - 1)
    frac = np.where(i0 < 0, 0.0, frac)
    i0 = np.clip(i0, 0, n_in - 1)
    return i0, i1, frac


def resize_bilinear_cv2(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """`cv2.resize(img, (width, height), interpolation=INTER_LINEAR)` in float (±1 on uint8).

    img: uint8 [H, W, C]. Unlike PIL, OpenCV does not antialias when shrinking.
    """
    a = np.asarray(img, dtype=np.float64)
    y0, y1, fy = _bilinear_weights(a.shape[0], height)
    x0, x1, fx = _bilinear_weights(a.shape[1], width)
    rows = a[y0] * (1.0 - fy)[:, None, None] + a[y1] * fy[:, None, None]
    out = rows[:, x0] * (1.0 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]
    return _sat_u8(out)


def merge_chroma(sr_rgb: np.ndarray, original_gray: np.ndarray) -> np.ndarray:
    """Colorization output (§7.8): chroma of the SR result + luma of the original grayscale image.

    sr_rgb: uint8 [h, w, 3] model output; original_gray: uint8 [H, W] (or [H, W, 3], reduced to
    BT.601 Y). The SR image is resized to (W, H) with OpenCV-style bilinear, converted to YUV, its
    Y replaced by the original luma, and converted back. Returns uint8 [H, W, 3] RGB.
    """
    sr_rgb = _check_rgb(sr_rgb)
    gray = np.asarray(original_gray)
    if gray.ndim == 3:
        gray = rgb_to_yuv(_check_rgb(gray))[..., 0]
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError(f"original_gray must be uint8 [H, W], got {gray.dtype} {gray.shape}")
    h, w = gray.shape
    yuv = rgb_to_yuv(resize_bilinear_cv2(sr_rgb, w, h))
    yuv[..., 0] = gray
    return yuv_to_rgb(yuv)
