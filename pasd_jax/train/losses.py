"""PASD's training losses (PASD_REFERENCE §8).

* `diffusion_mse`: mean((prediction − target)²) with target ε, or the velocity for v-prediction.
* `dr_l1`: Σ_s mean|to_rgb_s − bilinear(HQ, size_s)| over the DR net's RGB heads, HQ in [-1, 1]
  resized like PyTorch `F.interpolate(bilinear, align_corners=False)` — no antialiasing.
* `colorfulness`: Hasler–Süsstrunk colourfulness penalty of the grayscale variant. The reference
  adds it inside its per-scale loop and so counts Σ_s three times (§9.10); we add Σ_s once, so
  weight 0.003 here equals the reference's 0.001.

All losses compute in float32 whatever the activation dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def diffusion_mse(prediction: jnp.ndarray, target: jnp.ndarray) -> jnp.ndarray:
    """Scalar mean squared error over all elements (torch `F.mse_loss(..., reduction="mean")`)."""
    return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)))


def resize_bilinear_no_aa(image: jnp.ndarray, hw: tuple[int, int]) -> jnp.ndarray:
    """[B, H, W, C] -> [B, h, w, C], half-pixel bilinear without antialiasing (torch align_corners=False)."""
    b, _, _, c = image.shape
    return jax.image.resize(image.astype(jnp.float32), (b, hw[0], hw[1], c), method="linear", antialias=False)


def dr_l1(rgbs: Sequence[jnp.ndarray], hq: jnp.ndarray) -> tuple[jnp.ndarray, list[jnp.ndarray]]:
    """(Σ_s L1_s, [L1_s]) between each RGB head [B, H/2^s, W/2^s, 3] and the resized HQ [B, H, W, 3]."""
    parts = [jnp.mean(jnp.abs(r.astype(jnp.float32) - resize_bilinear_no_aa(hq, r.shape[1:3]))) for r in rgbs]
    return sum(parts), parts


def colorfulness(rgb: jnp.ndarray) -> jnp.ndarray:
    """Σ_batch (1 − (sqrt(std(rg)² + std(yb)²) + 0.3·sqrt(mean(rg)² + mean(yb)²))), rgb [B, h, w, 3].

    rg = |R − G|, yb = |(R + G)/2 − B|; std is unbiased like `torch.std`.
    """
    x = rgb.astype(jnp.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    rg, yb = jnp.abs(r - g), jnp.abs(0.5 * (r + g) - b)
    axes = (1, 2)
    std = jnp.sqrt(jnp.var(rg, axis=axes, ddof=1) + jnp.var(yb, axis=axes, ddof=1))
    mean = jnp.sqrt(jnp.square(jnp.mean(rg, axis=axes)) + jnp.square(jnp.mean(yb, axis=axes)))
    return jnp.sum(1.0 - (std + 0.3 * mean))
