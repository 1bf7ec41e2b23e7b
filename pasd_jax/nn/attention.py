"""Attention, GEGLU feed-forward, BasicTransformerBlock and Transformer2DModel.

Mirror diffusers `Attention` (AttnProcessor semantics, no mask), `FeedForward`/`GEGLU`,
`BasicTransformerBlock` (norm_type "layer_norm") and `Transformer2DModel` (continuous input).
The same Transformer2DModel serves as PASD's PACA module (context = a ControlNet residual) and,
with `pixel_cross_dim`, as PASD-light's text transformer with the extra `proj_in_plus`,
`norm2_plus` and `attn2_plus` (PASD_REFERENCE §2, §3).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from pasd_jax.nn.remat import ATTENTION_OUT, remat_block, tag
from pasd_jax.nn.resnet import conv2d, group_norm
from pasd_jax.perf.flops import ATTENTION_SCOPE


def layer_norm(eps: float = 1e-5, *, dtype=jnp.float32, param_dtype=jnp.float32) -> nn.LayerNorm:
    """torch `LayerNorm` (affine); two-pass variance, statistics in float32."""
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype)


#: Largest score matrix (B·heads·T·S elements) formed at once; above it queries go in chunks.
MAX_SCORE_ELEMENTS = 2**28


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, scale: float) -> jnp.ndarray:
    """softmax(q·kᵀ·scale)·v for q [B, T, H, D], k/v [B, S, H, D] -> [B, T, H, D].

    `jax.nn.dot_product_attention` when the [B, H, T, S] scores fit `MAX_SCORE_ELEMENTS`; else the
    queries run in chunks under `lax.map` (exact: softmax is per query row), which bounds memory
    for PACA at large latents (T = S = h·w tokens, e.g. 102,400 for a 320² latent tile).
    """
    with jax.named_scope(ATTENTION_SCOPE):  # lets the FLOP counter report attention apart
        return _attend(q, k, v, scale)


def _attend(q, k, v, scale):
    b, t, h, d = q.shape
    per_query = b * h * k.shape[1]
    if per_query * t <= MAX_SCORE_ELEMENTS:
        return jax.nn.dot_product_attention(q, k, v, scale=scale)
    chunk = max(1, MAX_SCORE_ELEMENTS // per_query)
    n = -(-t // chunk)
    qc = jnp.pad(q, ((0, 0), (0, n * chunk - t), (0, 0), (0, 0))).reshape(b, n, chunk, h, d)
    out = jax.lax.map(lambda qi: jax.nn.dot_product_attention(qi, k, v, scale=scale), jnp.moveaxis(qc, 1, 0))
    return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, h, v.shape[-1])[:, :t]


class Attention(nn.Module):
    """Multi-head attention, mirrors diffusers `Attention` (`to_q/to_k/to_v/to_out.0`).

    x: [B, T, query_dim], context: [B, S, cross_attention_dim] or None (self-attention)
    -> [B, T, query_dim]. Scores `q·kᵀ·dim_head^-0.5`, softmax in float32.
    """

    query_dim: int
    heads: int
    dim_head: int
    cross_attention_dim: Optional[int] = None
    bias: bool = False
    out_bias: bool = True
    upcast_attention: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        inner = self.heads * self.dim_head
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.to_q = nn.Dense(inner, use_bias=self.bias, **kw)
        self.to_k = nn.Dense(inner, use_bias=self.bias, **kw)
        self.to_v = nn.Dense(inner, use_bias=self.bias, **kw)
        self.to_out_0 = nn.Dense(self.query_dim, use_bias=self.out_bias, **kw)

    def __call__(self, x: jnp.ndarray, context: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        context = x if context is None else context
        b, t, _ = x.shape
        q = self.to_q(x).reshape(b, t, self.heads, self.dim_head)
        k = self.to_k(context).reshape(b, context.shape[1], self.heads, self.dim_head)
        v = self.to_v(context).reshape(b, context.shape[1], self.heads, self.dim_head)
        if self.upcast_attention:
            q, k = q.astype(jnp.float32), k.astype(jnp.float32)
            v = v.astype(jnp.float32)
        out = tag(attend(q, k, v, self.dim_head ** -0.5), ATTENTION_OUT)  # saved by remat "attention"
        return self.to_out_0(out.reshape(b, t, self.heads * self.dim_head).astype(self.dtype))


class GEGLU(nn.Module):
    """Mirrors diffusers `GEGLU`: `proj` to 2·inner, value half × exact-GELU(gate half)."""

    inner_dim: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.proj = nn.Dense(2 * self.inner_dim, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        value, gate = jnp.split(self.proj(x), 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """Mirrors diffusers `FeedForward` with GEGLU: `net.0` (GEGLU) -> `net.2` (Linear)."""

    dim: int
    mult: int = 4
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.net_0 = GEGLU(self.dim * self.mult, **kw)
        self.net_2 = nn.Dense(self.dim, **kw)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.net_2(self.net_0(x))


class BasicTransformerBlock(nn.Module):
    """Mirrors diffusers `BasicTransformerBlock` (layer_norm, GEGLU) plus PASD-light's extension.

    `x += attn1(norm1 x)`; `x += attn2(norm2 x, context)`; with `pixel_cross_dim` also
    `x += attn2_plus(norm2_plus x, pixel_context)`; `x += ff(norm3 x)`. x: [B, T, dim].
    `only_cross_attention` makes attn1 attend to the context too (as diffusers).
    """

    dim: int
    heads: int
    dim_head: int
    cross_attention_dim: Optional[int] = None
    only_cross_attention: bool = False
    upcast_attention: bool = False
    pixel_cross_dim: Optional[int] = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = lambda cross: Attention(self.dim, self.heads, self.dim_head, cross_attention_dim=cross,
                                       upcast_attention=self.upcast_attention, **kw)
        self.norm1 = layer_norm(**kw)
        self.attn1 = attn(self.cross_attention_dim if self.only_cross_attention else None)
        self.norm2 = layer_norm(**kw)
        self.attn2 = attn(self.cross_attention_dim)
        if self.pixel_cross_dim is not None:
            self.norm2_plus = layer_norm(**kw)
            self.attn2_plus = attn(self.pixel_cross_dim)
        self.norm3 = layer_norm(**kw)
        self.ff = FeedForward(self.dim, **kw)

    def __call__(self, x: jnp.ndarray, context: Optional[jnp.ndarray] = None,
                 pixel_context: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
        x = x + self.attn2(self.norm2(x), context)
        if self.pixel_cross_dim is not None:
            x = x + self.attn2_plus(self.norm2_plus(x), pixel_context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Mirrors diffusers `Transformer2DModel` for continuous inputs (also PASD's PACA module).

    `r = x; x = proj_in(norm(x))` (GroupNorm eps 1e-6), flatten to tokens [B, H·W, C] (row-major,
    index y·W + x), transformer blocks, `proj_out`, `+ r`. `proj_in/out` are 1×1 convs, or Linears
    with `use_linear_projection` (SD2). x: [B, H, W, C] -> [B, H, W, C].

    `remat_policy` (`pasd_jax.nn.remat`) rematerialises each transformer block.
    With `pixel_cross_dim` (PASD-light) the raw ControlNet residual `pixel_context`
    [B, H, W, pixel_cross_dim] goes through `proj_in_plus` and is the context of `attn2_plus`.
    """

    in_channels: int
    heads: int
    dim_head: int
    num_layers: int = 1
    cross_attention_dim: Optional[int] = None
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    pixel_cross_dim: Optional[int] = None
    remat_policy: str = "none"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * self.dim_head
        proj = (lambda f: nn.Dense(f, **kw)) if self.use_linear_projection else (lambda f: conv2d(f, 1, **kw))
        self.norm = group_norm(self.norm_num_groups, 1e-6, **kw)
        self.proj_in = proj(inner)
        if self.pixel_cross_dim is not None:
            self.proj_in_plus = proj(self.pixel_cross_dim)
        self.transformer_blocks = [
            remat_block(BasicTransformerBlock, self.remat_policy)(inner, self.heads, self.dim_head, self.cross_attention_dim,
                                  only_cross_attention=self.only_cross_attention,
                                  upcast_attention=self.upcast_attention,
                                  pixel_cross_dim=self.pixel_cross_dim, **kw)
            for _ in range(self.num_layers)
        ]
        self.proj_out = proj(self.in_channels)

    def __call__(self, x: jnp.ndarray, context: Optional[jnp.ndarray] = None,
                 pixel_context: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        b, h, w, _ = x.shape
        residual = x
        x = self.proj_in(self.norm(x))
        x = x.reshape(b, h * w, x.shape[-1])
        tokens = None
        if self.pixel_cross_dim is not None:
            tokens = self.proj_in_plus(pixel_context.astype(self.dtype))
            tokens = tokens.reshape(b, -1, tokens.shape[-1])
        for block in self.transformer_blocks:
            x = block(x, context, tokens)
        x = self.proj_out(x.reshape(b, h, w, x.shape[-1]))
        return x + residual
