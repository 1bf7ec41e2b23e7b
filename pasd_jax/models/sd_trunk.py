"""Config fields and encoder half shared by the SD UNet and the ControlNet.

Both diffusers `UNet2DConditionModel` and `ControlNetModel` are built from the same config keys
and share `conv_in`, `time_embedding`, `down_blocks` and `mid_block`; `SDTrunk` holds those
fields (named after config.json keys) and the builders, so the two models stay 1:1 with diffusers
without repeating the bookkeeping. NHWC throughout.
"""

from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from pasd_jax.models.configs import all_in, is_none, one_of, per_block
from pasd_jax.nn.embeddings import TimestepEmbedding, timestep_features
from pasd_jax.nn.unet_blocks import (CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock2D,
                                     UNetMidBlock2DCrossAttn, UpBlock2D)

DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
BLOCK_CLASSES = {"CrossAttnDownBlock2D": CrossAttnDownBlock2D, "DownBlock2D": DownBlock2D,
                 "UNetMidBlock2DCrossAttn": UNetMidBlock2DCrossAttn, "CrossAttnUpBlock2D": CrossAttnUpBlock2D,
                 "UpBlock2D": UpBlock2D}

# Config options of diffusers' UNet/ControlNet that SD1.x/SD2.x never set and we do not implement.
TRUNK_RULES = {
    "class_embed_type": is_none,
    "num_class_embeds": is_none,
    "addition_embed_type": is_none,
    "addition_time_embed_dim": is_none,
    "projection_class_embeddings_input_dim": is_none,
    "time_cond_proj_dim": is_none,
    "encoder_hid_dim": is_none,
    "encoder_hid_dim_type": is_none,
    "time_embedding_type": one_of("positional"),
    "time_embedding_dim": is_none,
    "time_embedding_act_fn": is_none,
    "timestep_post_act": is_none,
    "resnet_time_scale_shift": one_of("default"),
    "resnet_skip_time_act": one_of(False),
    "resnet_out_scale_factor": one_of(1, 1.0),
    "attention_type": one_of("default"),
    "dual_cross_attention": one_of(False),
    "cross_attention_norm": is_none,
    "act_fn": one_of("silu"),
    "mid_block_type": one_of("UNetMidBlock2DCrossAttn", None),
    "mid_block_only_cross_attention": one_of(None, False),
    "reverse_transformer_layers_per_block": is_none,
    "class_embeddings_concat": one_of(False),
    "down_block_types": all_in(DOWN_TYPES),
    "up_block_types": all_in(UP_TYPES),
    "cross_attention_dim": lambda v: isinstance(v, int) or len(set(v)) == 1,
}


class SDTrunk(nn.Module):
    """Fields of diffusers' SD UNet config plus the builders of the shared encoder half."""

    in_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    only_cross_attention: bool | Tuple[bool, ...] = False
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | Tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | Tuple[int, ...] = 768
    transformer_layers_per_block: int | Tuple[int, ...] = 1
    attention_head_dim: int | Tuple[int, ...] = 8
    num_attention_heads: Optional[int | Tuple[int, ...]] = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    conv_in_kernel: int = 3
    # Not a config.json key: per-block remat of the blocks (`pasd_jax.nn.remat`; training only).
    remat_policy: str = "none"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    # ---- per-block values, resolved as diffusers does -------------------------------------
    @property
    def n_blocks(self) -> int:
        return len(self.block_out_channels)

    def heads(self) -> tuple:
        """Head counts per down block (diffusers: `num_attention_heads or attention_head_dim`)."""
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return per_block(heads, self.n_blocks)

    def cross_dims(self) -> tuple:
        return per_block(self.cross_attention_dim, self.n_blocks)

    def layers(self) -> tuple:
        return per_block(self.layers_per_block, self.n_blocks)

    def transformer_layers(self) -> tuple:
        return per_block(self.transformer_layers_per_block, self.n_blocks)

    def only_cross(self) -> tuple:
        return per_block(self.only_cross_attention, self.n_blocks)

    def skip_channels(self) -> list[int]:
        """Channels of every down-path output, in ControlNet residual order (§4.4)."""
        chans = [self.block_out_channels[0]]
        for i, c in enumerate(self.block_out_channels):
            chans += [c] * self.layers()[i]
            if i < self.n_blocks - 1:
                chans.append(c)
        return chans

    def skip_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Spatial size of every down-path output for a [H, W] latent (stride-2 = ceil halving)."""
        sizes = [(height, width)]
        for i in range(self.n_blocks):
            sizes += [(height, width)] * self.layers()[i]
            if i < self.n_blocks - 1:
                height, width = -(-height // 2), -(-width // 2)
                sizes.append((height, width))
        return sizes

    # ---- builders (call from setup) ------------------------------------------------------
    def _kw(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def block_class(self, block_type: str):
        """Constructor of a block type ("DownBlock2D", ..., "UNetMidBlock2DCrossAttn"); subclasses
        swap in variants with the same fields (StableSR's SFT blocks)."""
        return BLOCK_CLASSES[block_type]

    def make_time_embedding(self) -> TimestepEmbedding:
        return TimestepEmbedding(4 * self.block_out_channels[0], **self._kw())

    def make_down_blocks(self) -> list:
        blocks = []
        for i, block_type in enumerate(self.down_block_types):
            cin = self.block_out_channels[max(i - 1, 0)]
            common = dict(in_channels=cin, out_channels=self.block_out_channels[i],
                          temb_channels=4 * self.block_out_channels[0], num_layers=self.layers()[i],
                          resnet_groups=self.norm_num_groups, resnet_eps=self.norm_eps,
                          add_downsample=i < self.n_blocks - 1, downsample_padding=self.downsample_padding,
                          remat_policy=self.remat_policy, **self._kw())
            if block_type == "CrossAttnDownBlock2D":
                blocks.append(self.block_class(block_type)(
                    heads=self.heads()[i], transformer_layers=self.transformer_layers()[i],
                    cross_attention_dim=self.cross_dims()[i], use_linear_projection=self.use_linear_projection,
                    only_cross_attention=self.only_cross()[i], upcast_attention=self.upcast_attention, **common))
            else:
                blocks.append(self.block_class("DownBlock2D")(**common))
        return blocks

    def make_mid_block(self) -> UNetMidBlock2DCrossAttn:
        c = self.block_out_channels[-1]
        return self.block_class("UNetMidBlock2DCrossAttn")(
            in_channels=c, out_channels=c, temb_channels=4 * self.block_out_channels[0], num_layers=1,
            resnet_groups=self.norm_num_groups, resnet_eps=self.norm_eps,
            output_scale_factor=self.mid_block_scale_factor, heads=self.heads()[-1],
            transformer_layers=self.transformer_layers()[-1], cross_attention_dim=self.cross_dims()[-1],
            use_linear_projection=self.use_linear_projection, upcast_attention=self.upcast_attention,
            remat_policy=self.remat_policy, **self._kw())

    # ---- shared forward pieces -----------------------------------------------------------
    def embed_time(self, timestep: jnp.ndarray, batch: int) -> jnp.ndarray:
        """[B] or scalar timesteps -> temb [B, 4·C0] (features in float32, then `dtype`)."""
        t = jnp.broadcast_to(jnp.atleast_1d(jnp.asarray(timestep)), (batch,))
        feats = timestep_features(t, self.block_out_channels[0], flip_sin_to_cos=self.flip_sin_to_cos,
                                  freq_shift=self.freq_shift)
        return self.time_embedding(feats.astype(self.dtype))

    def run_down(self, h: jnp.ndarray, temb: jnp.ndarray, context: jnp.ndarray):
        """conv_in output h -> (h after the last down block, all skips in residual order)."""
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context)
            skips.extend(block_skips)
        return h, skips

    def dummy_context(self, batch: int) -> jnp.ndarray:
        return jnp.zeros((batch, 1, self.cross_dims()[0]), self.dtype)
