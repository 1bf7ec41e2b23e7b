"""PASD UNet: diffusers `UNet2DConditionModel` (SD1.x / SD2.x) with PASD's up blocks.

`family="stock"` is the plain SD UNet (ControlNet residuals optional); `"pasd"` adds PACA
`pixel_attentions` to every up-block layer and `"pasd_light"` folds pixel-aware cross attention
into the text transformers of the cross-attention up blocks (PASD_REFERENCE §2, §3). In both
PASD families the ControlNet residuals are mandatory, as in the reference.

Shapes (NHWC): sample [B, h, w, 4], timestep [B] or scalar, encoder_hidden_states [B, L, D],
down residuals: list of [B, h_i, w_i, C_i] in ControlNet order, mid residual
[B, h/2^k, w/2^k, C_last]. Output: noise prediction [B, h, w, out_channels].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Sequence, Tuple

import jax.numpy as jnp
import flax.linen as nn

from pasd_jax.models.configs import FAMILY_KEY, UnsupportedConfigError, check_supported, module_kwargs
from pasd_jax.models.sd_trunk import TRUNK_RULES, SDTrunk
from pasd_jax.nn.resnet import conv2d, group_norm
from pasd_jax.nn.unet_blocks import FAMILIES


class UNet2DConditionModel(SDTrunk):
    """Mirrors diffusers `UNet2DConditionModel` + PASD up blocks (module doc for `family`)."""

    out_channels: int = 4
    up_block_types: Tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    conv_out_kernel: int = 3
    family: str = "stock"

    def setup(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown UNet family {self.family!r}; expected one of {FAMILIES}")
        kw = self._kw()
        self.conv_in = conv2d(self.block_out_channels[0], self.conv_in_kernel, **kw)
        self.time_embedding = self.make_time_embedding()
        self.down_blocks = self.make_down_blocks()
        self.mid_block = self.make_mid_block()
        self.up_blocks = self._make_up_blocks()
        self.conv_norm_out = group_norm(self.norm_num_groups, self.norm_eps, **kw)
        self.conv_out = conv2d(self.out_channels, self.conv_out_kernel, **kw)

    def _make_up_blocks(self) -> list:
        chans = tuple(reversed(self.block_out_channels))
        heads, cross = tuple(reversed(self.heads())), tuple(reversed(self.cross_dims()))
        layers, tlayers = tuple(reversed(self.layers())), tuple(reversed(self.transformer_layers()))
        only_cross = tuple(reversed(self.only_cross()))
        blocks = []
        for i, block_type in enumerate(self.up_block_types):
            common = dict(
                in_channels=chans[min(i + 1, self.n_blocks - 1)], out_channels=chans[i],
                prev_output_channel=chans[max(i - 1, 0)], temb_channels=4 * self.block_out_channels[0],
                num_layers=layers[i] + 1, resnet_groups=self.norm_num_groups, resnet_eps=self.norm_eps,
                add_upsample=i < self.n_blocks - 1, heads=heads[i], transformer_layers=tlayers[i],
                cross_attention_dim=cross[i], use_linear_projection=self.use_linear_projection,
                only_cross_attention=only_cross[i], upcast_attention=self.upcast_attention,
                family=self.family, remat_policy=self.remat_policy, **self._kw())
            cls = "CrossAttnUpBlock2D" if block_type == "CrossAttnUpBlock2D" else "UpBlock2D"
            blocks.append(self.block_class(cls)(**common))
        return blocks

    def __call__(self, sample: jnp.ndarray, timestep: jnp.ndarray, encoder_hidden_states: jnp.ndarray,
                 down_block_additional_residuals: Optional[Sequence[jnp.ndarray]] = None,
                 mid_block_additional_residual: Optional[jnp.ndarray] = None) -> jnp.ndarray:
        cn_down = down_block_additional_residuals
        if self.family != "stock" and (cn_down is None or mid_block_additional_residual is None):
            raise ValueError(f"the {self.family} UNet needs ControlNet residuals (down and mid)")
        sample = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        if self.center_input_sample:
            sample = 2 * sample - 1.0
        temb = self.embed_time(timestep, sample.shape[0])

        h, skips = self.run_down(self.conv_in(sample), temb, context)
        if cn_down is not None:
            if len(cn_down) != len(skips):
                raise ValueError(f"expected {len(skips)} down residuals, got {len(cn_down)}")
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, cn_down)]
        h = self.mid_block(h, temb, context)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual.astype(h.dtype)

        for i, block in enumerate(self.up_blocks):
            n = block.num_layers
            block_skips, skips = skips[-n:], skips[:-n]
            block_ctx = None
            if cn_down is not None:
                block_ctx, cn_down = cn_down[-n:], cn_down[:-n]
            # The next skip's size: equals ×2 unless a latent side is not a multiple of 2^k (§2.3).
            upsample_size = skips[-1].shape[1:3] if skips else None
            h = block(h, block_skips, temb, context, block_ctx, upsample_size)

        h = self.conv_out(nn.silu(self.conv_norm_out(h)))
        return h

    def init_inputs(self, batch: int = 1) -> dict:
        """Dummy kwargs for `init` / `eval_shape` (smallest latent that survives every downsample)."""
        size = 2 ** (self.n_blocks - 1)
        kwargs = dict(sample=jnp.zeros((batch, size, size, self.in_channels), self.dtype),
                      timestep=jnp.zeros((batch,), jnp.int32), encoder_hidden_states=self.dummy_context(batch))
        if self.family != "stock":
            sizes, chans = self.skip_sizes(size, size), self.skip_channels()
            kwargs["down_block_additional_residuals"] = [
                jnp.zeros((batch, h, w, c), self.dtype) for (h, w), c in zip(sizes, chans)]
            kwargs["mid_block_additional_residual"] = jnp.zeros(
                (batch,) + sizes[-1] + (self.block_out_channels[-1],), self.dtype)
        return kwargs


UNET_RULES = dict(TRUNK_RULES, **{"center_input_sample": lambda v: v in (False, True)})


def from_config(config: Mapping[str, Any], *, family: Optional[str] = None, dtype=jnp.float32,
                param_dtype=jnp.float32) -> UNet2DConditionModel:
    """Build the UNet from a diffusers `unet/config.json` dict.

    `family` defaults to the config's `_pasd_family` key (written by our converter), else "stock".
    """
    check_supported(config, UNET_RULES, "UNet2DConditionModel")
    family = family or config.get(FAMILY_KEY, "stock")
    if family not in FAMILIES:
        raise UnsupportedConfigError(f"unknown UNet family {family!r}; expected one of {FAMILIES}")
    kwargs = module_kwargs(UNet2DConditionModel, config, family=family, dtype=dtype, param_dtype=param_dtype)
    return UNet2DConditionModel(**kwargs)
