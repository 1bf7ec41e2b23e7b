"""StableSR's SFT UNet (`UNetModelDualcondV2`) as our diffusers-layout SD UNet with SFT resnets.

Mirrors `openaimodel.py: UNetModelDualcondV2` (STABLESR_REFERENCE §4): the SD2.1 UNet whose every
ResBlock is a `ResBlockDual` (`pasd_jax.nn.sft`), modulated by the time-aware encoder's features
`struct_cond = {str(width): [B, h_l, w_l, semb]}`. Everything that is not SFT is our stock
`UNet2DConditionModel` (diffusers layout; the converter maps the LDM names with the same prefix
table as SD single files, `convert.stablesr`), so parameters are stock SD2.1 + `spade/*`.

Differences from the reference, all numerically neutral: the reference's `Upsample` doubles the
size blindly (latent sides must be multiples of 2^(levels−1), §10.2); ours upsamples to the skip's
size, which is the same whenever the reference works. The reference casts `h` to float32 before
the blocks; we follow the `dtype` policy like every other model (float32 by default).

Shapes (NHWC): sample [B, h, w, 4], timestep [B] or scalar (original 0..999 step), context
[B, L, D], struct_cond as above. Output: eps [B, h, w, out_channels].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from pasd_jax.models.configs import UnsupportedConfigError, check_supported, module_kwargs
from pasd_jax.models.unet import UNET_RULES, UNet2DConditionModel
from pasd_jax.nn.sft import SFT_BLOCK_CLASSES

#: Key our converter writes into a StableSR UNet config (diffusers configs never have it).
STABLESR_KEY = "_stablesr"


class StableSRUNet(UNet2DConditionModel):
    """Mirrors `UNetModelDualcondV2`: the stock UNet (family "stock") with SFT blocks."""

    semb_channels: int = 256

    def block_class(self, block_type: str):
        cls = SFT_BLOCK_CLASSES[block_type]

        def build(**kwargs):
            return cls(semb_channels=self.semb_channels, **kwargs)
        return build

    def __call__(self, sample: jnp.ndarray, timestep: jnp.ndarray, encoder_hidden_states: jnp.ndarray,
                 struct_cond: Mapping[str, jnp.ndarray]) -> jnp.ndarray:
        if self.family != "stock":
            raise ValueError("the StableSR UNet has no PASD family")
        sample = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        temb = (self.embed_time(timestep, sample.shape[0]), dict(struct_cond))
        h, skips = self.run_down(self.conv_in(sample), temb, context)
        h = self.mid_block(h, temb, context)
        for block in self.up_blocks:
            n = block.num_layers
            block_skips, skips = skips[-n:], skips[:-n]
            upsample_size = skips[-1].shape[1:3] if skips else None
            h = block(h, block_skips, temb, context, None, upsample_size)
        return self.conv_out(nn.silu(self.conv_norm_out(h)))

    def init_inputs(self, batch: int = 1) -> dict:
        """Dummy kwargs for `init` / `eval_shape`: smallest latent, one feature per level width."""
        size = 2 ** (self.n_blocks - 1)
        feats = {str(size >> i): jnp.zeros((batch, size >> i, size >> i, self.semb_channels), self.dtype)
                 for i in range(self.n_blocks)}
        return dict(sample=jnp.zeros((batch, size, size, self.in_channels), self.dtype),
                    timestep=jnp.zeros((batch,), jnp.int32), encoder_hidden_states=self.dummy_context(batch),
                    struct_cond=feats)


def from_config(config: Mapping[str, Any], *, dtype=jnp.float32, param_dtype=jnp.float32) -> StableSRUNet:
    """Build from a converted StableSR `unet/config.json` (diffusers keys + `semb_channels`)."""
    check_supported(config, UNET_RULES, "StableSRUNet")
    if "semb_channels" not in config:
        raise UnsupportedConfigError("StableSRUNet config has no semb_channels (not a StableSR UNet)")
    return StableSRUNet(**module_kwargs(StableSRUNet, config, dtype=dtype, param_dtype=param_dtype))


def config_from_ldm(params: Mapping[str, Any]) -> dict:
    """diffusers-style config from the `unet_config.params` of a StableSR yaml (§2.1).

    Level l has attention when 2^l is in `attention_resolutions`; heads = C_l / num_head_channels
    (or `num_heads` when num_head_channels is −1); `legacy` does not change spatial transformers.
    """
    mult = list(params.get("channel_mult", (1, 2, 4, 8)))
    mc, attn = int(params["model_channels"]), set(params["attention_resolutions"])
    chans = [mc * m for m in mult]
    head_ch, num_heads = int(params.get("num_head_channels", -1)), int(params.get("num_heads", -1))
    if int(params.get("transformer_depth", 1)) != 1 or params.get("use_spatial_transformer") is False:
        raise UnsupportedConfigError("StableSR UNet: only transformer_depth 1 spatial transformers are supported")
    if params.get("disable_self_attentions") or params.get("use_scale_shift_norm") or params.get("resblock_updown"):
        raise UnsupportedConfigError("StableSR UNet: disable_self_attentions / use_scale_shift_norm / "
                                     "resblock_updown are not supported")
    heads = [c // head_ch if head_ch != -1 else num_heads for c in chans]
    cross = [2 ** level in attn for level in range(len(chans))]
    return {
        STABLESR_KEY: True,
        "in_channels": int(params.get("in_channels", 4)), "out_channels": int(params.get("out_channels", 4)),
        "block_out_channels": chans, "layers_per_block": int(params["num_res_blocks"]),
        "down_block_types": ["CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross],
        "up_block_types": ["CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross)],
        "attention_head_dim": heads, "cross_attention_dim": int(params["context_dim"]),
        "use_linear_projection": bool(params.get("use_linear_in_transformer", False)),
        "semb_channels": int(params["semb_channels"]),
    }
