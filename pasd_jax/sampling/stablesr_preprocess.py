"""How StableSR's scripts read their LR images (STABLESR_REFERENCE §8.3 step 1, §8.5 step 1).

* `load_img_old` (`_old` script's `load_img` + transforms): PIL LANCZOS resize to sides rounded
  down to multiples of 32, `/255`, `2x − 1`, torchvision `Resize(input_size)` (shorter side,
  bilinear, no antialias) and `CenterCrop(input_size)`, clamp to [−1, 1]. Identities for an
  input_size² image.
* `read_image_tile` (`_tile` script's `read_image`): `/255` then `(x − 0.5)/0.5` (can differ from
  `2x − 1` by one ulp, quirk §10.19).

Both take a uint8 RGB array [H, W, 3] and return float32 HWC.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pasd_jax.imaging.torch_resize import resize_bilinear


def load_img_old(rgb: np.ndarray, input_size: int) -> np.ndarray:
    rgb = np.asarray(rgb, np.uint8)
    h, w = rgb.shape[:2]
    h32, w32 = h - h % 32, w - w % 32
    if min(h32, w32) < 32:
        raise ValueError(f"image {w}x{h} is smaller than 32 px on a side (the _old script rounds down to 32)")
    if (h32, w32) != (h, w):
        rgb = np.asarray(Image.fromarray(rgb).resize((w32, h32), resample=Image.LANCZOS))
    x = (np.asarray(rgb, np.float32) / np.float32(255.0)) * 2.0 - 1.0
    short, long_ = min(h32, w32), max(h32, w32)
    other = int(input_size * long_ / short)
    size = (input_size, other) if h32 <= w32 else (other, input_size)
    x = resize_bilinear(x[None], size)[0]
    top = int(round((x.shape[0] - input_size) / 2.0))
    left = int(round((x.shape[1] - input_size) / 2.0))
    return np.clip(x[top:top + input_size, left:left + input_size], -1.0, 1.0).astype(np.float32)


def read_image_tile(rgb: np.ndarray) -> np.ndarray:
    x = np.asarray(rgb, np.float32) / np.float32(255.0)
    return ((x - np.float32(0.5)) / np.float32(0.5)).astype(np.float32)
