"""UNet down / mid / up blocks, mirroring diffusers `unet_2d_blocks` and PASD's up blocks.

`family` selects the up-block flavour (PASD_REFERENCE §2, §3):
  * "stock": diffusers `UpBlock2D` / `CrossAttnUpBlock2D`;
  * "pasd": plus one PACA `Transformer2DModel` per layer in `pixel_attentions` whose context is
    the (un-summed, already scaled) ControlNet residual of the skip that layer consumes;
  * "pasd_light": no PACA in `UpBlock2D`; the text transformers of `CrossAttnUpBlock2D` get
    `proj_in_plus/norm2_plus/attn2_plus` and take the ControlNet residual as `pixel_context`.
All tensors NHWC: hidden [B, H, W, C], temb [B, T], context (text) [B, L, D].
`remat_policy` (`pasd_jax.nn.remat`) rematerialises each ResnetBlock2D and each transformer block.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from pasd_jax.nn.attention import Transformer2DModel
from pasd_jax.nn.remat import remat_block
from pasd_jax.nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D

FAMILIES = ("stock", "pasd", "pasd_light")


class _BlockBase(nn.Module):
    """Fields shared by every block (resnet/attention settings from the UNet config)."""

    in_channels: int
    out_channels: int
    temb_channels: int
    num_layers: int = 1
    resnet_groups: int = 32
    resnet_eps: float = 1e-5
    output_scale_factor: float = 1.0
    remat_policy: str = "none"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _resnet(self, cin: int, cout: int) -> ResnetBlock2D:
        return remat_block(ResnetBlock2D, self.remat_policy)(cin, cout, self.temb_channels, groups=self.resnet_groups, eps=self.resnet_eps,
                             output_scale_factor=self.output_scale_factor, dtype=self.dtype,
                             param_dtype=self.param_dtype)


class _AttnBlockBase(_BlockBase):
    """Adds the text-transformer settings."""

    heads: int = 8
    transformer_layers: int = 1
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False

    def _transformer(self, channels: int, cross_dim: Optional[int],
                     pixel_cross_dim: Optional[int] = None, num_layers: Optional[int] = None) -> Transformer2DModel:
        return Transformer2DModel(
            channels, self.heads, channels // self.heads,
            num_layers=self.transformer_layers if num_layers is None else num_layers,
            cross_attention_dim=cross_dim, norm_num_groups=self.resnet_groups,
            use_linear_projection=self.use_linear_projection, only_cross_attention=self.only_cross_attention,
            upcast_attention=self.upcast_attention, pixel_cross_dim=pixel_cross_dim,
            remat_policy=self.remat_policy, dtype=self.dtype, param_dtype=self.param_dtype)


class DownBlock2D(_BlockBase):
    """Mirrors diffusers `DownBlock2D`: resnets, optional stride-2 downsampler.

    Returns (h, skips) with one skip per layer plus the downsampler output.
    """

    add_downsample: bool = True
    downsample_padding: int = 1

    def setup(self):
        self.resnets = [self._resnet(self.in_channels if i == 0 else self.out_channels, self.out_channels)
                        for i in range(self.num_layers)]
        if self.add_downsample:
            self.downsamplers = [Downsample2D(self.out_channels, self.downsample_padding, dtype=self.dtype,
                                              param_dtype=self.param_dtype)]

    def __call__(self, h, temb, context=None) -> Tuple[jnp.ndarray, Tuple[jnp.ndarray, ...]]:
        skips = []
        for resnet in self.resnets:
            h = resnet(h, temb)
            skips.append(h)
        if self.add_downsample:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, tuple(skips)


class CrossAttnDownBlock2D(_AttnBlockBase):
    """Mirrors diffusers `CrossAttnDownBlock2D`: (resnet → text transformer) per layer, downsampler."""

    add_downsample: bool = True
    downsample_padding: int = 1

    def setup(self):
        self.resnets = [self._resnet(self.in_channels if i == 0 else self.out_channels, self.out_channels)
                        for i in range(self.num_layers)]
        self.attentions = [self._transformer(self.out_channels, self.cross_attention_dim)
                           for _ in range(self.num_layers)]
        if self.add_downsample:
            self.downsamplers = [Downsample2D(self.out_channels, self.downsample_padding, dtype=self.dtype,
                                              param_dtype=self.param_dtype)]

    def __call__(self, h, temb, context=None) -> Tuple[jnp.ndarray, Tuple[jnp.ndarray, ...]]:
        skips = []
        for resnet, attn in zip(self.resnets, self.attentions):
            h = attn(resnet(h, temb), context)
            skips.append(h)
        if self.add_downsample:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, tuple(skips)


class UNetMidBlock2DCrossAttn(_AttnBlockBase):
    """Mirrors diffusers `UNetMidBlock2DCrossAttn`: resnets.0 → attentions.0 → resnets.1."""

    def setup(self):
        self.resnets = [self._resnet(self.in_channels, self.in_channels)
                        for _ in range(self.num_layers + 1)]
        self.attentions = [self._transformer(self.in_channels, self.cross_attention_dim)
                           for _ in range(self.num_layers)]

    def __call__(self, h, temb, context=None) -> jnp.ndarray:
        h = self.resnets[0](h, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            h = resnet(attn(h, context), temb)
        return h


class _UpMixin:
    """Channel bookkeeping shared by both up blocks (diffusers `get_up_block` semantics)."""

    def _skip_channels(self, i: int) -> int:
        """Channels of the skip consumed by layer i (`res_skip_channels`)."""
        return self.in_channels if i == self.num_layers - 1 else self.out_channels

    def _resnet_in(self, i: int) -> int:
        return self.prev_output_channel if i == 0 else self.out_channels

    def _upsample(self, h, upsample_size):
        if self.add_upsample:
            h = self.upsamplers[0](h, upsample_size)
        return h


class UpBlock2D(_AttnBlockBase, _UpMixin):
    """Mirrors diffusers `UpBlock2D`; with family "pasd" also PASD's PACA `pixel_attentions`.

    PASD builds this block's PACA with cross-attention width `out_channels` (PASD_REFERENCE §9.2),
    which only fits when the consumed skip has that width; that is checked at construction.
    """

    prev_output_channel: int = 0
    add_upsample: bool = True
    family: str = "stock"

    def setup(self):
        self.resnets = [self._resnet(self._resnet_in(i) + self._skip_channels(i), self.out_channels)
                        for i in range(self.num_layers)]
        if self.family == "pasd":
            if self.in_channels != self.out_channels:
                raise ValueError(
                    f"PASD UpBlock2D PACA has cross-attention width out_channels={self.out_channels} but its "
                    f"last layer's ControlNet residual has {self.in_channels} channels (PASD_REFERENCE §9.2)")
            self.pixel_attentions = [self._transformer(self.out_channels, self.out_channels, num_layers=None)
                                     for _ in range(self.num_layers)]
        if self.add_upsample:
            self.upsamplers = [Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype)]

    def __call__(self, h, skips: Sequence[jnp.ndarray], temb, context=None,
                 pixel_contexts: Optional[Sequence[jnp.ndarray]] = None, upsample_size=None):
        for i, resnet in enumerate(self.resnets):
            k = self.num_layers - 1 - i  # layers pop skips from the end
            h = resnet(jnp.concatenate([h, skips[k].astype(h.dtype)], axis=-1), temb)
            if self.family == "pasd":
                ctx = pixel_contexts[k]
                h = self.pixel_attentions[i](h, ctx.reshape(ctx.shape[0], -1, ctx.shape[-1]).astype(h.dtype))
        return self._upsample(h, upsample_size)


class CrossAttnUpBlock2D(_AttnBlockBase, _UpMixin):
    """Mirrors diffusers `CrossAttnUpBlock2D` and PASD's two variants of it (see module doc)."""

    prev_output_channel: int = 0
    add_upsample: bool = True
    family: str = "stock"

    def setup(self):
        n = self.num_layers
        self.resnets = [self._resnet(self._resnet_in(i) + self._skip_channels(i), self.out_channels)
                        for i in range(n)]
        light = self.family == "pasd_light"
        self.attentions = [
            self._transformer(self.out_channels, self.cross_attention_dim,
                              pixel_cross_dim=self._skip_channels(i) if light else None)
            for i in range(n)]
        if self.family == "pasd":
            self.pixel_attentions = [self._transformer(self.out_channels, self._skip_channels(i))
                                     for i in range(n)]
        if self.add_upsample:
            self.upsamplers = [Upsample2D(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype)]

    def __call__(self, h, skips: Sequence[jnp.ndarray], temb, context=None,
                 pixel_contexts: Optional[Sequence[jnp.ndarray]] = None, upsample_size=None):
        for i, (resnet, attn) in enumerate(zip(self.resnets, self.attentions)):
            k = self.num_layers - 1 - i
            h = resnet(jnp.concatenate([h, skips[k].astype(h.dtype)], axis=-1), temb)
            if self.family == "pasd_light":
                h = attn(h, context, pixel_contexts[k])
            else:
                h = attn(h, context)
            if self.family == "pasd":
                ctx = pixel_contexts[k]
                h = self.pixel_attentions[i](h, ctx.reshape(ctx.shape[0], -1, ctx.shape[-1]).astype(h.dtype))
        return self._upsample(h, upsample_size)
