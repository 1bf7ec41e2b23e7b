"""ESRGAN residual-in-residual dense blocks, mirroring basicsr `ResidualDenseBlock` / `RRDB`.

PASD's DR net (`controlnet_cond_embedding.preprocesser`, PASD_REFERENCE §4.2) imports these from
basicsr when `use_rrdb` is set. Attribute names equal basicsr's (`rdb1..rdb3`, `conv1..conv5`) so
the torch keys `preprocesser.{i}.rdb{j}.conv{k}.{weight,bias}` convert mechanically. NHWC.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from pasd_jax.nn.resnet import conv2d

_SLOPE = 0.2  # leaky-ReLU negative slope
_RES_SCALE = 0.2  # residual scaling of both the dense block and the RRDB


class ResidualDenseBlock(nn.Module):
    """Mirrors basicsr `ResidualDenseBlock` (5 densely connected 3×3 convs, 0.2-scaled residual).

    `conv_k` maps `num_feat + (k-1)·num_grow_ch -> num_grow_ch` (k = 1..4), `conv5` maps
    `num_feat + 4·num_grow_ch -> num_feat`; inputs are concatenated along channels in the order
    [x, x1, x2, ...]. x: [B, H, W, num_feat] -> [B, H, W, num_feat].
    """

    num_feat: int = 64
    num_grow_ch: int = 32
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.conv1 = conv2d(self.num_grow_ch, 3, **kw)
        self.conv2 = conv2d(self.num_grow_ch, 3, **kw)
        self.conv3 = conv2d(self.num_grow_ch, 3, **kw)
        self.conv4 = conv2d(self.num_grow_ch, 3, **kw)
        self.conv5 = conv2d(self.num_feat, 3, **kw)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(nn.leaky_relu(conv(jnp.concatenate(feats, axis=-1)), _SLOPE))
        x5 = self.conv5(jnp.concatenate(feats, axis=-1))
        return x5 * _RES_SCALE + x


class RRDB(nn.Module):
    """Mirrors basicsr `RRDB`: `0.2·rdb3(rdb2(rdb1(x))) + x`. x: [B, H, W, num_feat] -> same."""

    num_feat: int
    num_grow_ch: int = 32
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(num_feat=self.num_feat, num_grow_ch=self.num_grow_ch, dtype=self.dtype,
                  param_dtype=self.param_dtype)
        self.rdb1 = ResidualDenseBlock(**kw)
        self.rdb2 = ResidualDenseBlock(**kw)
        self.rdb3 = ResidualDenseBlock(**kw)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        out = self.rdb3(self.rdb2(self.rdb1(x)))
        return out * _RES_SCALE + x
