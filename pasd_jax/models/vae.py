"""SD VAE: diffusers `AutoencoderKL` (Encoder / Decoder / quant convs) in Flax linen, NHWC.

Parameter paths equal the torch state-dict keys (`encoder/down_blocks_0/resnets_1/conv1`,
`encoder/mid_block/attentions_0/to_q`, `quant_conv`, `decoder/up_blocks_2/upsamplers_0/conv`, …),
so `convert.mapping.torch_to_flax` maps a diffusers VAE mechanically. Checkpoints saved with the
pre-0.14 attention names (`query/key/value/proj_attn`) go through `rename_legacy_vae_keys` first.

All VAE norms use eps 1e-6 and `norm_num_groups` groups, as diffusers hard-codes for the VAE.
Two static options serve `pasd_jax.sampling.tiled_vae` and leave parameters unchanged:
`norm_over_batch` shares every GroupNorm's statistics across the batch axis (tiles of one image
stacked on it), and `attention_query_chunk` runs the mid-block attention one sample and that many
queries at a time (exact, bounds the [T, T] score matrix to [chunk, T]).
Shapes: image [B, H, W, in_channels] in [-1, 1]; latent [B, H/2^k, W/2^k, latent_channels] with
k = len(block_out_channels) - 1 (8× for SD). Latents here are *unscaled*: the sampler multiplies
by `scaling_factor` after `encode` and divides by it before `decode`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax.models.configs import UnsupportedConfigError, all_in, check_supported, is_none, module_kwargs, one_of
from pasd_jax.nn.attention import Attention
from pasd_jax.perf.flops import ATTENTION_SCOPE
from pasd_jax.nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D, conv2d, group_norm

VAE_EPS = 1e-6  # diffusers' Encoder/Decoder pass resnet_eps=1e-6 and build their norms with eps=1e-6


class VAEAttention(Attention):
    """Mirrors diffusers' VAE mid-block `Attention` (`_from_deprecated_attn_block`, residual).

    `r = x; x = group_norm(x)` → tokens [B, H·W, C] (row-major) → single-head attention with
    dim_head = C, q/k/v/out with bias, softmax in float32 → `+ r` (rescale_output_factor 1).
    Parameter names: `group_norm`, `to_q`, `to_k`, `to_v`, `to_out_0`. x: [B, H, W, C].
    `query_chunk > 0`: samples one after another (`lax.map`) and `query_chunk` queries at a time,
    so scores take [query_chunk, H·W] floats instead of [B, H·W, H·W]; softmax is per query row,
    so this is exact up to float rounding.
    """

    norm_num_groups: int = 32
    eps: float = VAE_EPS
    norm_over_batch: bool = False
    query_chunk: int = 0

    def setup(self):
        super().setup()
        self.group_norm = group_norm(self.norm_num_groups, self.eps, pool_batch=self.norm_over_batch,
                                     dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)
        if self.query_chunk > 0:
            out = self._chunked_attention(tokens)
        else:
            out = super().__call__(tokens)
        return out.reshape(b, h, w, c) + x

    def _chunked_attention(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """Single-head self-attention of tokens [B, T, C] -> [B, T, C], memory O(query_chunk·T)."""
        q, k, v = (proj(tokens).astype(jnp.float32) for proj in (self.to_q, self.to_k, self.to_v))
        scale = self.dim_head ** -0.5

        def one_sample(qkv):
            q1, k1, v1 = qkv  # [T, C] each

            def one_query(qi):  # [C] -> [C]; lax.map vmaps this over query_chunk rows
                probs = jax.nn.softmax(k1 @ (qi * scale))
                return probs @ v1

            return jax.lax.map(one_query, q1, batch_size=self.query_chunk)

        with jax.named_scope(ATTENTION_SCOPE):  # the FLOP counter reports attention apart
            out = jax.lax.map(one_sample, (q, k, v))
        return self.to_out_0(out.astype(self.dtype))


def _vae_attention(channels: int, groups: int, norm_over_batch: bool, query_chunk: int, kw: dict) -> VAEAttention:
    # diffusers: attention_head_dim = channels -> heads = 1; bias=True; upcast_softmax=True.
    return VAEAttention(query_dim=channels, heads=1, dim_head=channels, bias=True, out_bias=True,
                        upcast_attention=True, norm_num_groups=groups, eps=VAE_EPS,
                        norm_over_batch=norm_over_batch, query_chunk=query_chunk, **kw)


class VAEMidBlock(nn.Module):
    """Mirrors diffusers `UNetMidBlock2D` as the VAE builds it (no temb, eps 1e-6, one layer).

    `resnets_0 → attentions_0 → resnets_1`; without `add_attention` the attention is skipped
    (and has no parameters, as diffusers stores `None`). [B, H, W, C] -> [B, H, W, C].
    """

    channels: int
    groups: int = 32
    add_attention: bool = True
    norm_over_batch: bool = False
    attention_query_chunk: int = 0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.resnets = [ResnetBlock2D(self.channels, self.channels, None, groups=self.groups, eps=VAE_EPS,
                                      norm_over_batch=self.norm_over_batch, **kw)
                        for _ in range(2)]
        if self.add_attention:
            self.attentions = [_vae_attention(self.channels, self.groups, self.norm_over_batch,
                                              self.attention_query_chunk, kw)]

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = self.resnets[0](x)
        if self.add_attention:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    """Mirrors diffusers `DownEncoderBlock2D`: `num_layers` resnets, then an optional
    `downsamplers_0` (3×3 stride-2 conv after a (0, 1) pad, i.e. `downsample_padding=0`).
    [B, H, W, Cin] -> [B, floor(H/2), floor(W/2), Cout] (no downsample: [B, H, W, Cout])."""

    in_channels: int
    out_channels: int
    num_layers: int
    groups: int = 32
    add_downsample: bool = True
    norm_over_batch: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.resnets = [ResnetBlock2D(self.in_channels if i == 0 else self.out_channels, self.out_channels, None,
                                      groups=self.groups, eps=VAE_EPS, norm_over_batch=self.norm_over_batch, **kw)
                        for i in range(self.num_layers)]
        if self.add_downsample:
            self.downsamplers = [Downsample2D(self.out_channels, padding=0, **kw)]

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for resnet in self.resnets:
            x = resnet(x)
        if self.add_downsample:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    """Mirrors diffusers `UpDecoderBlock2D`: `num_layers` resnets, then an optional
    `upsamplers_0` (nearest ×2 + 3×3 conv). [B, H, W, Cin] -> [B, 2H, 2W, Cout]."""

    in_channels: int
    out_channels: int
    num_layers: int
    groups: int = 32
    add_upsample: bool = True
    norm_over_batch: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.resnets = [ResnetBlock2D(self.in_channels if i == 0 else self.out_channels, self.out_channels, None,
                                      groups=self.groups, eps=VAE_EPS, norm_over_batch=self.norm_over_batch, **kw)
                        for i in range(self.num_layers)]
        if self.add_upsample:
            self.upsamplers = [Upsample2D(self.out_channels, **kw)]

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        for resnet in self.resnets:
            x = resnet(x)
        if self.add_upsample:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """Mirrors diffusers `vae.Encoder` (double_z): conv_in → down blocks → mid → norm/SiLU →
    conv_out. [B, H, W, in_channels] -> [B, H/2^k, W/2^k, 2·latent_channels] (mean ‖ logvar)."""

    in_channels: int
    latent_channels: int
    block_out_channels: Tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    mid_block_add_attention: bool = True
    norm_over_batch: bool = False
    attention_query_chunk: int = 0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pool, chunk = self.norm_over_batch, self.attention_query_chunk
        chans, n = self.block_out_channels, len(self.block_out_channels)
        self.conv_in = conv2d(chans[0], 3, **kw)
        self.down_blocks = [
            DownEncoderBlock2D(chans[max(i - 1, 0)], chans[i], self.layers_per_block, self.norm_num_groups,
                               add_downsample=i < n - 1, norm_over_batch=pool, **kw)
            for i in range(n)]
        self.mid_block = VAEMidBlock(chans[-1], self.norm_num_groups, self.mid_block_add_attention,
                                     pool, chunk, **kw)
        self.conv_norm_out = group_norm(self.norm_num_groups, VAE_EPS, pool_batch=pool, **kw)
        self.conv_out = conv2d(2 * self.latent_channels, 3, **kw)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(nn.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """Mirrors diffusers `vae.Decoder` (norm_type "group"): conv_in → mid → up blocks
    (layers_per_block+1 resnets each) → norm/SiLU → conv_out.
    [B, h, w, latent_channels] -> [B, h·2^k, w·2^k, out_channels]."""

    out_channels: int
    block_out_channels: Tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    mid_block_add_attention: bool = True
    norm_over_batch: bool = False
    attention_query_chunk: int = 0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pool, chunk = self.norm_over_batch, self.attention_query_chunk
        chans, n = tuple(reversed(self.block_out_channels)), len(self.block_out_channels)
        self.conv_in = conv2d(chans[0], 3, **kw)
        self.mid_block = VAEMidBlock(chans[0], self.norm_num_groups, self.mid_block_add_attention,
                                     pool, chunk, **kw)
        self.up_blocks = [
            UpDecoderBlock2D(chans[max(i - 1, 0)], chans[i], self.layers_per_block + 1, self.norm_num_groups,
                             add_upsample=i < n - 1, norm_over_batch=pool, **kw)
            for i in range(n)]
        self.conv_norm_out = group_norm(self.norm_num_groups, VAE_EPS, pool_batch=pool, **kw)
        self.conv_out = conv2d(self.out_channels, 3, **kw)

    def __call__(self, z: jnp.ndarray) -> jnp.ndarray:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(nn.silu(self.conv_norm_out(h)))


class AutoencoderKL(nn.Module):
    """Mirrors diffusers `AutoencoderKL` (no tiling/slicing). Fields are the config keys.

    `encode(x)` -> (mean, logvar), `decode(z)` -> image, `__call__(x)` = decode(mean) (used by
    `init` so every parameter exists). Outputs are float32 whatever `dtype` is.
    `scaling_factor` / `force_upcast` are carried for the caller (pipeline), unused here.
    `norm_over_batch` / `attention_query_chunk` are runtime switches, not config keys (module
    docstring); diffusers configs do not have them; set them with `module.clone(...)`.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.18215
    force_upcast: bool = True
    norm_over_batch: bool = False
    attention_query_chunk: int = 0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        common = dict(block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                      norm_num_groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
                      norm_over_batch=self.norm_over_batch, attention_query_chunk=self.attention_query_chunk,
                      **kw)
        self.encoder = Encoder(self.in_channels, self.latent_channels, **common)
        self.decoder = Decoder(self.out_channels, **common)
        if self.use_quant_conv:
            self.quant_conv = conv2d(2 * self.latent_channels, 1, **kw)
        if self.use_post_quant_conv:
            self.post_quant_conv = conv2d(self.latent_channels, 1, **kw)

    @property
    def downscale(self) -> int:
        """Image side / latent side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def encode(self, x: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
        """x [B, H, W, in_channels] in [-1, 1] -> (mean, logvar), each float32
        [B, H//2^k, W//2^k, latent_channels] (odd sides floor, as diffusers); logvar clipped to [-30, 20] as
        diffusers' `DiagonalGaussianDistribution` does."""
        moments = self.encoder(x.astype(self.dtype))
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jnp.ndarray) -> jnp.ndarray:
        """Unscaled latent z [B, h, w, latent_channels] -> raw decoder output float32
        [B, h·2^k, w·2^k, out_channels] (no clamp; roughly [-1, 1])."""
        z = z.astype(self.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Reconstruction of x through the posterior mean (mainly for `init`)."""
        return self.decode(self.encode(x)[0])

    def init_inputs(self, batch: int = 1) -> dict:
        """Dummy kwargs for `init` / `eval_shape`: the smallest image that survives every downsample."""
        return dict(x=jnp.zeros((batch, self.downscale, self.downscale, self.in_channels), self.dtype))


# Keys are checked only when present. latents_mean/std and shift_factor change how the caller
# scales latents (SDXL/SD3-style VAEs); our pipeline only applies `scaling_factor`, so refuse them.
VAE_RULES = {
    "act_fn": one_of("silu", "swish"),
    "down_block_types": all_in(("DownEncoderBlock2D",)),
    "up_block_types": all_in(("UpDecoderBlock2D",)),
    "latents_mean": is_none,
    "latents_std": is_none,
    "shift_factor": lambda v: v is None or v == 0,
    "norm_type": one_of("group"),
}


def from_config(config: Mapping[str, Any], *, dtype=jnp.float32, param_dtype=jnp.float32) -> AutoencoderKL:
    """Build the VAE from a diffusers `vae/config.json` dict (unsupported options raise
    `UnsupportedConfigError`; `sample_size` only drives diffusers' tiling and is ignored)."""
    check_supported(config, VAE_RULES, "AutoencoderKL")
    kwargs = module_kwargs(AutoencoderKL, config, dtype=dtype, param_dtype=param_dtype)
    n = len(kwargs.get("block_out_channels", (64,)))
    for key in ("down_block_types", "up_block_types"):
        if key in config and len(config[key]) != n:
            raise UnsupportedConfigError(f"AutoencoderKL: {key} has {len(config[key])} entries, "
                                         f"block_out_channels has {n}")
    return AutoencoderKL(**kwargs)


# Pre-0.14 diffusers (and some hub conversions) name the mid-block attention
# `query/key/value/proj_attn`, sometimes stored as 1×1 conv weights [C, C, 1, 1].
_LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_legacy_vae_keys(state_dict: Mapping[str, Any]) -> dict:
    """Map legacy VAE attention keys onto current diffusers names; other keys pass through.

    `….attentions.0.{query,key,value,proj_attn}.{weight,bias}` →
    `….attentions.0.{to_q,to_k,to_v,to_out.0}.{weight,bias}`; a 4-D `[C, C, 1, 1]` weight is
    squeezed to the Linear layout `[C, C]`. `group_norm` keeps its name. Idempotent on
    current-format dicts; raises ValueError if a renamed key would collide with an existing one.
    Arrays are returned as given (numpy or torch), only reshaped when squeezed.
    """
    out: dict = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if len(parts) >= 4 and parts[-4] == "attentions" and parts[-3].isdigit() \
                and parts[-2] in _LEGACY_ATTENTION_NAMES:
            key = ".".join(parts[:-2] + [_LEGACY_ATTENTION_NAMES[parts[-2]], parts[-1]])
            if parts[-1] == "weight" and len(np.shape(value)) == 4:
                if tuple(np.shape(value)[2:]) != (1, 1):
                    raise ValueError(f"{'.'.join(parts)}: expected a 1×1 conv weight, got {np.shape(value)}")
                value = value[:, :, 0, 0]
        out[key] = value
    if len(out) != len(state_dict):
        raise ValueError("legacy VAE key rename collides with existing current-format keys "
                         "(the state dict mixes legacy and current attention names)")
    return out
