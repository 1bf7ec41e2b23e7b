"""StableSR's spatial feature transform: `SPADE`, `ResBlockDual` and the SFT variants of the UNet blocks.

Mirrors `ldm/modules/spade.py: SPADE` and `openaimodel.py: ResBlockDual` of StableSR
(STABLESR_REFERENCE §3, §4). A `ResBlockDual` is our `ResnetBlock2D` (same parameter names
`norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut`, same numerics: GroupNorm32 eps 1e-5,
SiLU) with one extra step on the residual branch, `h = spade(h, struct_cond)`, before `skip(x) + h`.

How the encoder features reach the resnets: the stock blocks of `pasd_jax.nn.unet_blocks` only
hand `temb` through to their resnets, so an SFT block receives `temb` as the pair
`(temb [B, T], struct_cond {str(width): [B, h_l, w_l, semb]})` and its `ResBlockDual` unpacks it.
The block classes below are the stock ones with `_resnet` swapped; everything else (attention,
skips, up/down sampling) is the stock code. NHWC throughout.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax.numpy as jnp

from pasd_jax.nn.resnet import ResnetBlock2D, conv2d, group_norm
from pasd_jax.nn.unet_blocks import (CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D,
                                     UNetMidBlock2DCrossAttn, UpBlock2D)

#: Hidden width of SPADE's shared conv (hard-coded 128 in the reference).
SPADE_HIDDEN = 128


class SPADE(nn.Module):
    """Mirrors StableSR `SPADE(norm_nc, label_nc, 'spadeinstance3x3')`.

    `n = param_free_norm(h)` (despite the name an *affine* GroupNorm32(32, C), eps 1e-5, stats in
    float32); `a = ReLU(mlp_shared_0(seg))` (3×3, label_nc → 128); `out = n·(1 + mlp_gamma(a)) +
    mlp_beta(a)` (both 3×3, 128 → C). h: [B, H, W, C], seg: [B, H, W, label_nc] (same H, W; the
    reference never resizes). Returns [B, H, W, C].
    """

    norm_nc: int
    label_nc: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.param_free_norm = group_norm(32, 1e-5, **kw)
        self.mlp_shared_0 = conv2d(SPADE_HIDDEN, 3, **kw)
        self.mlp_gamma = conv2d(self.norm_nc, 3, **kw)
        self.mlp_beta = conv2d(self.norm_nc, 3, **kw)

    def __call__(self, h: jnp.ndarray, seg: jnp.ndarray) -> jnp.ndarray:
        if seg.shape[1:3] != h.shape[1:3]:
            raise ValueError(f"SPADE: struct_cond feature {seg.shape[1:3]} does not match the "
                             f"hidden state {h.shape[1:3]}")
        normalized = self.param_free_norm(h)
        actv = nn.relu(self.mlp_shared_0(seg.astype(self.dtype)))
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


def pick_feature(struct_cond: Mapping[str, jnp.ndarray], h: jnp.ndarray) -> jnp.ndarray:
    """The encoder feature for hidden state h [B, H, W, C]: the entry keyed by h's **width**
    (`str(W)`), as the reference's `struct_cond[str(x.size(-1))]` (quirk §10.1)."""
    key = str(h.shape[2])
    if key not in struct_cond:
        raise KeyError(f"no struct_cond feature of width {key} (have {sorted(struct_cond, key=int)})")
    return struct_cond[key]


class ResBlockDual(ResnetBlock2D):
    """Mirrors StableSR `ResBlockDual`: `ResnetBlock2D` + SPADE on the residual branch.

    `h = conv2(SiLU(norm2(conv1(SiLU(norm1 x)) + time_emb_proj(SiLU emb))))`;
    `h = spade(h, struct_cond[str(W)])`; `out = skip(x) + h`. `temb` is the pair
    `(emb [B, T], struct_cond dict)` (module docstring). x: [B, H, W, Cin] -> [B, H, W, Cout].
    """

    semb_channels: int = 256

    def setup(self):
        super().setup()
        if self.output_scale_factor != 1.0:
            raise ValueError("ResBlockDual has no output scale factor")
        self.spade = SPADE(self.out_channels, self.semb_channels, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x: jnp.ndarray, temb=None) -> jnp.ndarray:
        emb, struct_cond = temb
        h = self.conv1(nn.silu(self.norm1(x)))
        h = h + self.time_emb_proj(nn.silu(emb))[:, None, None, :]
        h = self.conv2(nn.silu(self.norm2(h)))
        h = self.spade(h, pick_feature(struct_cond, h))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x)
        return x + h


class _SFTResnets:
    """Builds `ResBlockDual` where the stock block builds `ResnetBlock2D` (needs `semb_channels`)."""

    def _resnet(self, cin: int, cout: int) -> ResBlockDual:
        return ResBlockDual(cin, cout, self.temb_channels, groups=self.resnet_groups, eps=self.resnet_eps,
                            output_scale_factor=self.output_scale_factor, semb_channels=self.semb_channels,
                            dtype=self.dtype, param_dtype=self.param_dtype)


class SFTDownBlock2D(_SFTResnets, DownBlock2D):
    """`DownBlock2D` with `ResBlockDual` resnets (StableSR input blocks without attention)."""

    semb_channels: int = 256


class SFTCrossAttnDownBlock2D(_SFTResnets, CrossAttnDownBlock2D):
    """`CrossAttnDownBlock2D` with `ResBlockDual` resnets."""

    semb_channels: int = 256


class SFTUNetMidBlock2DCrossAttn(_SFTResnets, UNetMidBlock2DCrossAttn):
    """`UNetMidBlock2DCrossAttn` with `ResBlockDual` resnets (StableSR `middle_block`)."""

    semb_channels: int = 256


class SFTUpBlock2D(_SFTResnets, UpBlock2D):
    """`UpBlock2D` (family "stock") with `ResBlockDual` resnets."""

    semb_channels: int = 256


class SFTCrossAttnUpBlock2D(_SFTResnets, CrossAttnUpBlock2D):
    """`CrossAttnUpBlock2D` (family "stock") with `ResBlockDual` resnets."""

    semb_channels: int = 256


SFT_BLOCK_CLASSES = {"DownBlock2D": SFTDownBlock2D, "CrossAttnDownBlock2D": SFTCrossAttnDownBlock2D,
                     "UNetMidBlock2DCrossAttn": SFTUNetMidBlock2DCrossAttn, "UpBlock2D": SFTUpBlock2D,
                     "CrossAttnUpBlock2D": SFTCrossAttnUpBlock2D}
