"""ResNet block, down/up-samplers and the conv / norm factories shared by all models.

Mirrors diffusers `ResnetBlock2D`, `Downsample2D` and `Upsample2D` (SD1.x/SD2.x semantics).
Everything is NHWC; parameter names equal the torch attribute names (`norm1`, `conv1`,
`time_emb_proj`, `conv_shortcut`, `conv`), so conversion is mechanical.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class Conv2d(nn.Conv):
    """`nn.Conv` (same parameters, same result) that computes a convolution whose input is smaller
    than its kernel in both spatial dims as patches · kernel (a dot).

    XLA swaps the operands of such a convolution (the input becomes the kernel: the weights are
    reversed and convolved in a batch-as-feature layout), which on XLA:CPU runs a 3×3 1280→1280 conv
    on a [2, 2, 2, 1280] input in ~350 ms instead of ~10 ms: SD1.5's 2×2 lowest level at a 16²
    latent made one CFG step 2.4× slower than diffusers'. Only explicit padding (as `conv2d` makes)
    and no dilation/groups take that path. x: [B, H, W, Cin] -> [B, H', W', features].
    """

    @nn.compact
    def __call__(self, inputs: jnp.ndarray) -> jnp.ndarray:
        kh, kw = self.kernel_size
        small = inputs.ndim == 4 and inputs.shape[1] < kh and inputs.shape[2] < kw
        pair = lambda v: (1, 1) if v is None else tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
        explicit = not isinstance(self.padding, (str, int)) and all(len(p) == 2 for p in self.padding)
        if not small or not explicit or self.feature_group_count != 1 or any(
                d != 1 for d in pair(self.kernel_dilation) + pair(self.input_dilation)):
            return super().__call__(inputs)
        cin = inputs.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (kh, kw, cin, self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        x, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        (pt, pb), (pl, pr) = self.padding
        sh, sw = pair(self.strides)
        x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
        oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
        patches = jnp.concatenate([x[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
                                   for i in range(kh) for j in range(kw)], axis=-1)  # (i, j, c) order
        y = jax.lax.dot_general(patches, kernel.reshape(kh * kw * cin, self.features),
                                (((3,), (0,)), ((), ())), precision=self.precision)
        return y if bias is None else y + bias


def conv2d(features: int, kernel: int = 3, *, stride: int = 1, padding: Optional[int] = None,
           dtype=jnp.float32, param_dtype=jnp.float32, name: Optional[str] = None) -> nn.Conv:
    """A torch-style `Conv2d` with symmetric explicit padding (default `(kernel-1)//2`).

    Explicit padding matters: Flax "SAME" pads (0, 1) for stride-2 convs on even inputs, torch
    pads (1, 1), which picks different pixels (PASD_REFERENCE §10).
    """
    pad = (kernel - 1) // 2 if padding is None else padding
    return Conv2d(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                  dtype=dtype, param_dtype=param_dtype, name=name)


class BatchPooledGroupNorm(nn.GroupNorm):
    """GroupNorm whose statistics are shared by every sample of the batch (tiled VAE).

    Mirrors multidiffusion-upscaler's `GroupNormParam.summary` + `custom_group_norm` (used by PASD's
    tiled VAE) for equal-size tiles stacked on the batch axis: per sample and group the mean and
    the *biased* (two-pass) variance are computed in float32, then averaged over the batch with
    equal weights (the reference weights tiles by pixel count; ours all have the same size). Note
    this averages variances, it is not the pooled variance of all pixels. With a batch of one it
    is exactly `nn.GroupNorm`. Same parameters (`scale`, `bias`) as `nn.GroupNorm`. x: [N, H, W, C].
    """

    @nn.compact
    def __call__(self, x, *, mask=None):
        if mask is not None:
            raise NotImplementedError("BatchPooledGroupNorm does not take a mask")
        n, c, g = x.shape[0], x.shape[-1], self.num_groups
        if c % g:
            raise ValueError(f"{g} groups do not divide {c} channels")
        xg = x.astype(jnp.float32).reshape(n, -1, g, c // g)
        mean_t = jnp.mean(xg, axis=(1, 3), keepdims=True)                    # [N, 1, G, 1]
        var_t = jnp.mean(jnp.square(xg - mean_t), axis=(1, 3), keepdims=True)  # biased, per tile
        mean, var = jnp.mean(mean_t, axis=0), jnp.mean(var_t, axis=0)         # [1, G, 1]
        y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)


def group_norm(num_groups: int, eps: float, *, pool_batch: bool = False, dtype=jnp.float32,
               param_dtype=jnp.float32, name: Optional[str] = None) -> nn.GroupNorm:
    """torch `GroupNorm` over the channel (last) axis; statistics in float32, two-pass variance.

    `pool_batch=True` gives `BatchPooledGroupNorm` (statistics shared across the batch axis,
    same parameter names); the default is a plain `nn.GroupNorm`.
    """
    cls = BatchPooledGroupNorm if pool_batch else nn.GroupNorm
    return cls(num_groups=num_groups, epsilon=eps, use_fast_variance=False,
               dtype=dtype, param_dtype=param_dtype, name=name)


def nearest_resize(x: jnp.ndarray, size: Sequence[int]) -> jnp.ndarray:
    """torch `interpolate(mode="nearest")` to `size` = (H', W'): out[i] = in[floor(i·H/H')].

    `jax.image.resize(method="nearest")` uses half-pixel centres and picks other pixels, so the
    index is computed explicitly. An exact ×2 is a plain repeat. x: [B, H, W, C].
    """
    h, w = x.shape[1], x.shape[2]
    out_h, out_w = int(size[0]), int(size[1])
    if (out_h, out_w) == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = (jnp.arange(out_h) * h) // out_h
    cols = (jnp.arange(out_w) * w) // out_w
    return x[:, rows][:, :, cols]


class ResnetBlock2D(nn.Module):
    """Mirrors diffusers `ResnetBlock2D` (resnet_time_scale_shift="default", dropout 0).

    `h = conv1(SiLU(norm1(x))) + time_emb_proj(SiLU(temb))`; `h = conv2(SiLU(norm2(h)))`;
    `out = (shortcut(x) + h) / output_scale_factor`. x: [B, H, W, Cin] -> [B, H, W, Cout].
    `temb_channels=None` (VAE) drops the time projection. `norm_over_batch` makes both norms
    `BatchPooledGroupNorm` (tiled VAE; same parameters).
    """

    in_channels: int
    out_channels: int
    temb_channels: Optional[int] = None
    groups: int = 32
    groups_out: Optional[int] = None
    eps: float = 1e-5
    output_scale_factor: float = 1.0
    norm_over_batch: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.norm1 = group_norm(self.groups, self.eps, pool_batch=self.norm_over_batch, **kw)
        self.conv1 = conv2d(self.out_channels, 3, **kw)
        if self.temb_channels is not None:
            self.time_emb_proj = nn.Dense(self.out_channels, **kw)
        self.norm2 = group_norm(self.groups_out or self.groups, self.eps, pool_batch=self.norm_over_batch, **kw)
        self.conv2 = conv2d(self.out_channels, 3, **kw)
        if self.in_channels != self.out_channels:
            self.conv_shortcut = conv2d(self.out_channels, 1, **kw)

    def __call__(self, x: jnp.ndarray, temb: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        h = self.conv1(nn.silu(self.norm1(x)))
        if self.temb_channels is not None:
            h = h + self.time_emb_proj(nn.silu(temb))[:, None, None, :]
        h = self.conv2(nn.silu(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """Mirrors diffusers `Downsample2D` with a conv: 3×3 stride 2.

    `padding=1` (UNet) pads symmetrically; `padding=0` (VAE encoder) pads (0, 1) on H and W first,
    as diffusers does. [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), Cout].
    """

    out_channels: int
    padding: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.conv = conv2d(self.out_channels, 3, stride=2, padding=self.padding,
                           dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Mirrors diffusers `Upsample2D` with a conv: nearest ×2 (or to `output_size`) then 3×3 conv."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.conv = conv2d(self.out_channels, 3, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x: jnp.ndarray, output_size: Optional[Sequence[int]] = None) -> jnp.ndarray:
        size = (2 * x.shape[1], 2 * x.shape[2]) if output_size is None else output_size
        return self.conv(nearest_resize(x, size))
