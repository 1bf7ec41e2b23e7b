"""Attention, GEGLU feed-forward, BasicTransformerBlock and Transformer2DModel.

Mirror diffusers `Attention` (AttnProcessor semantics, no mask), `FeedForward`/`GEGLU`,
`BasicTransformerBlock` (norm_type "layer_norm") and `Transformer2DModel` (continuous input).
The same Transformer2DModel serves as PASD's PACA module (context = a ControlNet residual) and,
with `pixel_cross_dim`, as PASD-light's text transformer with the extra `proj_in_plus`,
`norm2_plus` and `attn2_plus` (PASD_REFERENCE §2, §3).
"""

from __future__ import annotations

import os
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


#: Implementation of `attend`: "auto" (below), "xla" (`jax.nn.dot_product_attention`, full
#: scores), "chunked" (online softmax, `chunked_attention`) or "cudnn" (fused kernel, GPU only).
#: Read from $PASD_JAX_ATTENTION at import; `set_attention_implementation` changes it (re-jit).
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn")
_implementation = os.environ.get("PASD_JAX_ATTENTION", "auto")

#: "auto" uses the chunked kernel when the [B, H, T, S] score matrix has more elements than this
#: (4 Mi = 16 MiB of float32). On a 2-core CPU it is ~10× faster than XLA's full-score attention
#: at SD1.5's 4096-token first level and never forms the full matrix (measured: benchmarks/notes).
CHUNK_THRESHOLD = 2**22
#: Query / key rows per block of the chunked kernel: a [B, H, 512, 512] float32 score block is
#: 16 MiB at B·H = 16 (a CFG pair of SD1.5's 8 heads). On a 2-core CPU (with the folded reductions
#: and the row sums in p·[v, 1]), [2, 4096, 8, 40] self-attention takes 0.37 s with 512×512 blocks,
#: 0.37 s with 1024×256, 0.38-0.39 s with 512×256 or 256×512, 0.45 s with 256×256 and 0.47-0.49 s
#: with 512×128 or 128×512 (XLA's full-score attention: 2.24 s; torch SDPA: 0.21 s).
QUERY_BLOCK = 512
KEY_BLOCK = 512


def set_attention_implementation(name: str) -> None:
    """Select the `attend` implementation for later traces (functions already jitted keep theirs)."""
    global _implementation
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {name!r}")
    _implementation = name


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, scale: float) -> jnp.ndarray:
    """softmax(q·kᵀ·scale)·v for q [B, T, H, D], k [B, S, H, D], v [B, S, H, Dv] -> [B, T, H, Dv].

    "auto": on a GPU with bfloat16/float16 inputs the cuDNN fused kernel (`jax.nn.dot_product_attention
    (..., implementation="cudnn")`), falling back when cuDNN refuses the shape (e.g. head dim > 128,
    the VAE's 512) or is absent; otherwise `chunked_attention` when the score matrix exceeds
    `CHUNK_THRESHOLD` elements, else XLA's attention. Scores and softmax are float32 in every path.
    """
    impl = _implementation
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"PASD_JAX_ATTENTION must be one of {ATTENTION_IMPLEMENTATIONS}, got {impl!r}")
    with jax.named_scope(ATTENTION_SCOPE):  # lets the FLOP counter report attention apart
        half = q.dtype in (jnp.bfloat16, jnp.float16)
        if impl == "cudnn" or (impl == "auto" and half and jax.default_backend() == "gpu"):
            try:
                return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
            except Exception:  # noqa: BLE001 - cuDNN refuses at trace time (shape, dtype, version)
                if impl == "cudnn":  # asked for explicitly: no silent fallback
                    raise
        b, t, h, _ = q.shape
        if impl == "chunked" or (impl != "xla" and b * h * t * k.shape[1] > CHUNK_THRESHOLD):
            return chunked_attention(q, k, v, scale)
        return jax.nn.dot_product_attention(q, k, v, scale=scale)


#: Lanes left by `_fold_last` before the final reduce: XLA:CPU's tree-reduction rewriter turns a
#: reduce over more than 32 elements into a reduce-window plus a reduce (for summation accuracy),
#: and that reduce-window over a [B, H, 512, 512] score block is slow: 4.1 s of a 19 s SD1.5 CFG
#: step at a 64² latent went to the two row reductions of the chunked kernel (2-core CPU profile).
_FOLD_LANES = 32


def _fold_last(x: jnp.ndarray, op) -> jnp.ndarray:
    """Pairwise-fold the last axis with `op` (halves combined elementwise) while it is even and
    longer than `_FOLD_LANES`; the caller then reduces what is left. The same max exactly; a
    pairwise (at least as accurate) order for sums. Used on the CPU backend only."""
    while x.shape[-1] > _FOLD_LANES and x.shape[-1] % 2 == 0:
        half = x.shape[-1] // 2
        x = op(x[..., :half], x[..., half:])
    return x


def chunked_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, scale: float,
                      query_block: int | None = None, key_block: int | None = None) -> jnp.ndarray:
    """Exact attention in blocks with an online softmax (the FlashAttention recurrence) in plain JAX.

    Queries go in blocks of `query_block` (`lax.map`), keys/values in blocks of `key_block`
    (`lax.scan`) carrying the running row max m, normaliser l and output accumulator:
    `m' = max(m, max s)`, `l' = l·e^(m−m') + Σ e^(s−m')`, `acc' = acc·e^(m−m') + e^(s−m')·v`,
    output `acc / l`. Equal to softmax(q·kᵀ·scale)·v up to float rounding (~1e-7 in float32), with
    memory O(B·H·query_block·key_block) instead of O(B·H·T·S). Ragged T / S are padded (padded keys
    masked with −∞, padded queries dropped). Each query block is rematerialised in the backward
    pass, so gradients are memory-efficient too. Shapes as `attend`; output dtype of q.
    """
    b, t, h, d = q.shape
    s_len, dv = k.shape[1], v.shape[-1]
    qb = min(query_block or QUERY_BLOCK, t)
    kb = min(key_block or KEY_BLOCK, s_len)
    nq, nk = -(-t // qb), -(-s_len // kb)
    to_heads = lambda x, n, blk: jnp.moveaxis(  # [B, L, H, D] -> [n, B, H, blk, D] (padded)
        jnp.pad(x, ((0, 0), (0, n * blk - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
        .reshape(b, h, n, blk, x.shape[-1]), 2, 0)
    # float32: the scale goes on q (T·D multiplies, not one more pass over every T·S score block);
    # half precision keeps it on the float32 scores, where it adds no rounding
    post_scale = 1.0 if q.dtype == jnp.float32 else scale
    qs = to_heads(q * scale if post_scale == 1.0 else q, nq, qb)
    # CPU: the row max is folded before its reduce (`_FOLD_LANES`), and v gets a column of ones so
    # that p·[v, 1] also yields the row sums Σp (one pass over p fewer; [2, 4096, 8, 40] self-
    # attention 10-20 % faster on a 2-core CPU)
    cpu = jax.default_backend() == "cpu"
    row_max = (lambda s: _fold_last(s, jnp.maximum).max(-1)) if cpu else (lambda s: s.max(-1))
    if cpu:
        v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
    ks, vs = to_heads(k, nk, kb), to_heads(v, nk, kb)
    key_bias = None
    if nk * kb != s_len:  # −∞ on padded keys; never a whole block, so every row sees a real key
        key_bias = jnp.where(jnp.arange(nk * kb) < s_len, 0.0, -jnp.inf).astype(jnp.float32).reshape(nk, 1, 1, 1, kb)

    def one_query_block(qi):  # [B, H, qb, D] -> [B, H, qb, Dv] float32
        def step(carry, kv):
            m, l, acc = carry
            ki, vi, bias = kv
            s = jnp.einsum("bhqd,bhkd->bhqk", qi, ki, preferred_element_type=jnp.float32)
            if post_scale != 1.0:
                s = s * post_scale
            if bias is not None:
                s = s + bias
            m_new = jnp.maximum(m, row_max(s))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(vi.dtype), vi, preferred_element_type=jnp.float32)
            if not cpu:
                l = l * corr + p.sum(-1)
            return (m_new, l, acc * corr[..., None] + pv), None

        init = (jnp.full((b, h, qb), -jnp.inf, jnp.float32), jnp.zeros((b, h, qb), jnp.float32),
                jnp.zeros((b, h, qb, vs.shape[-1]), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(step, init, (ks, vs, key_bias))
        if cpu:
            acc, l = acc[..., :dv], acc[..., dv]
        return acc / l[..., None]

    out = jax.lax.map(jax.checkpoint(one_query_block), qs)  # [nq, B, H, qb, Dv]
    out = out.transpose(1, 0, 3, 2, 4).reshape(b, nq * qb, h, dv)
    return out[:, :t].astype(q.dtype)


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
