"""Timestep features and embedding MLP (mirror diffusers `Timesteps` / `TimestepEmbedding`)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp


def timestep_features(
    timesteps: jnp.ndarray,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jnp.ndarray:
    """Sinusoidal timestep features, mirrors diffusers `get_timestep_embedding`.

    Args:
      timesteps: [B] (or scalar) integer or float timesteps.
      dim: feature width (C_0 of the UNet).
    Returns:
      [B, dim] float32: `[cos, sin]` halves when `flip_sin_to_cos` (SD), else `[sin, cos]`.
    """
    timesteps = jnp.atleast_1d(jnp.asarray(timesteps)).astype(jnp.float32)
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """`linear_1 -> SiLU -> linear_2`, mirrors diffusers `TimestepEmbedding` ([B, C0] -> [B, 4·C0])."""

    time_embed_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        dense = lambda: nn.Dense(self.time_embed_dim, dtype=self.dtype, param_dtype=self.param_dtype)
        self.linear_1 = dense()
        self.linear_2 = dense()

    def __call__(self, features: jnp.ndarray) -> jnp.ndarray:
        return self.linear_2(nn.silu(self.linear_1(features.astype(self.dtype))))
