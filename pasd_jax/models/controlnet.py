"""PASD ControlNet: diffusers `ControlNetModel` with PASD's pyramid degradation-removal (DR) net.

Mirrors `pasd/models/pasd/controlnet.py` (PASD_REFERENCE §4): the stock SD ControlNet trunk
(`conv_in`, `time_embedding`, `down_blocks`, `mid_block`, shared with the UNet through `SDTrunk`),
the zero-initialised 1×1 convs `controlnet_down_blocks` / `controlnet_mid_block`, and a conditioning
embedding that also returns RGB images at 1/2, 1/4, 1/8 of the LQ resolution.

Shapes (NHWC): sample [B, h, w, 4], timestep [B] or scalar, encoder_hidden_states [B, L, D],
controlnet_cond [B, 8h, 8w, 3] in [0, 1]. Outputs: rgbs (list of [B, H/2^s, W/2^s, 3], s = 1..3,
or None), down residuals (list of [B, h_i, w_i, C_i] in the order of §4.4), mid residual.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from pasd_jax.models.configs import check_supported, module_kwargs, one_of
from pasd_jax.models.sd_trunk import TRUNK_RULES, SDTrunk
from pasd_jax.nn.resnet import Conv2d, conv2d
from pasd_jax.nn.rrdb import RRDB

# Top-level params that `ControlNetModel.from_unet` copies from the UNet (diffusers semantics).
_TRUNK_PARAM_RE = re.compile(r"conv_in|time_embedding|down_blocks_\d+|mid_block")

NUM_RRDB = 2  # PASD hard-codes two RRDBs in the DR preprocesser


def zero_conv(features: int, kernel: int = 1, *, dtype=jnp.float32, param_dtype=jnp.float32) -> nn.Conv:
    """diffusers `zero_module(nn.Conv2d(...))`: kernel and bias initialised to zeros, padding k//2."""
    pad = (kernel - 1) // 2
    return Conv2d(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), dtype=dtype,
                  param_dtype=param_dtype, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)


class ControlNetConditioningEmbedding(nn.Module):
    """Mirrors PASD's DR net `ControlNetConditioningEmbedding` (PASD_REFERENCE §4.2).

    With c = `block_out_channels`: `e = SiLU(conv_in(I))`, optionally two RRDBs (`preprocesser`),
    then per level i: `e = SiLU(blocks[2i](e))` (3×3, c_i -> c_i), `e = SiLU(blocks[2i+1](e))`
    (3×3 stride 2, symmetric pad 1, c_i -> c_{i+1}), `rgbs.append(to_rgbs[i](e))`; finally the
    zero-initialised `conv_out` (c_last -> `conditioning_embedding_channels`).
    I: [B, H, W, conditioning_channels] -> (feature [B, H/2^k, W/2^k, C0], rgbs list of
    [B, H/2^s, W/2^s, 3] for s = 1..k; empty when `return_rgbs` is False), k = len(c) - 1.
    """

    conditioning_embedding_channels: int
    conditioning_channels: int = 3
    block_out_channels: Tuple[int, ...] = (16, 32, 96, 256)
    return_rgbs: bool = True
    use_rrdb: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = self.block_out_channels
        self.conv_in = conv2d(c[0], 3, **kw)
        if self.use_rrdb:
            self.preprocesser = [RRDB(c[0], c[0], **kw) for _ in range(NUM_RRDB)]
        blocks, to_rgbs = [], []
        for i in range(len(c) - 1):
            blocks.append(conv2d(c[i], 3, **kw))
            blocks.append(conv2d(c[i + 1], 3, stride=2, padding=1, **kw))
            if self.return_rgbs:
                to_rgbs.append(conv2d(3, 3, **kw))
        self.blocks = blocks
        if self.return_rgbs:
            self.to_rgbs = to_rgbs
        self.conv_out = zero_conv(self.conditioning_embedding_channels, 3, **kw)

    def __call__(self, conditioning: jnp.ndarray) -> Tuple[jnp.ndarray, list]:
        e = nn.silu(self.conv_in(conditioning.astype(self.dtype)))
        if self.use_rrdb:
            for rrdb in self.preprocesser:
                e = rrdb(e)
        rgbs = []
        for i, block in enumerate(self.blocks):
            e = nn.silu(block(e))
            if i % 2 == 1 and self.return_rgbs:
                rgbs.append(self.to_rgbs[i // 2](e))
        return self.conv_out(e), rgbs


class ControlNetModel(SDTrunk):
    """Mirrors PASD's `ControlNetModel` (stock diffusers ControlNet + DR net; module doc for shapes).

    Config fields beyond the SD trunk are the diffusers/PASD `controlnet/config.json` keys.
    `conv_in` is always 3×3, as in diffusers (`conv_in_kernel` is a UNet-only option).
    """

    conditioning_channels: int = 3
    conditioning_embedding_out_channels: Tuple[int, ...] = (16, 32, 96, 256)
    controlnet_conditioning_channel_order: str = "rgb"
    global_pool_conditions: bool = False
    return_rgbs: bool = True
    use_rrdb: bool = False

    def setup(self):
        kw = self._kw()
        c0 = self.block_out_channels[0]
        self.conv_in = conv2d(c0, 3, **kw)
        self.time_embedding = self.make_time_embedding()
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            c0, self.conditioning_channels, tuple(self.conditioning_embedding_out_channels),
            return_rgbs=self.return_rgbs, use_rrdb=self.use_rrdb, **kw)
        self.down_blocks = self.make_down_blocks()
        self.mid_block = self.make_mid_block()
        self.controlnet_down_blocks = [zero_conv(ch, 1, **kw) for ch in self.skip_channels()]
        self.controlnet_mid_block = zero_conv(self.block_out_channels[-1], 1, **kw)

    @property
    def cond_downscale(self) -> int:
        """LQ-image / latent size ratio implied by the DR net (8 for four levels)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def embed_condition(self, controlnet_cond: jnp.ndarray) -> jnp.ndarray:
        """The DR net's feature alone: controlnet_cond [B, 8h, 8w, 3] -> [B, h, w, C0] (no rgbs).

        It depends on the LQ image only, not on the latent, timestep or prompt, so a sampler
        computes it once per image and passes it to every step as `cond_feature`."""
        return self._dr_net(controlnet_cond)[0]

    def _dr_net(self, controlnet_cond: jnp.ndarray):
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(f"unknown controlnet_conditioning_channel_order "
                             f"{self.controlnet_conditioning_channel_order!r}")
        cond = controlnet_cond.astype(self.dtype)
        if self.controlnet_conditioning_channel_order == "bgr":
            cond = jnp.flip(cond, axis=-1)
        return self.controlnet_cond_embedding(cond)

    def __call__(self, sample: jnp.ndarray, timestep: jnp.ndarray, encoder_hidden_states: jnp.ndarray,
                 controlnet_cond: jnp.ndarray | None, conditioning_scale: float | jnp.ndarray = 1.0,
                 guess_mode: bool = False, cond_feature: jnp.ndarray | None = None):
        """Returns `(rgbs or None, down_res list, mid_res)`; residuals scaled, rgbs never (§4.3).

        `cond_feature` ([B, h, w, C0], from `embed_condition`) replaces the DR net on
        `controlnet_cond` (which may then be None); rgbs are None in that case."""
        sample = sample.astype(self.dtype)
        context = encoder_hidden_states.astype(self.dtype)
        temb = self.embed_time(timestep, sample.shape[0])

        if cond_feature is None:
            if controlnet_cond is None:
                raise ValueError("ControlNetModel needs controlnet_cond or cond_feature")
            feature, rgbs = self._dr_net(controlnet_cond)
            where = f"controlnet_cond {controlnet_cond.shape[1:3]} must be {self.cond_downscale}× the"
        else:
            feature, rgbs = cond_feature.astype(self.dtype), None
            where = f"cond_feature {cond_feature.shape[1:3]} must equal the"
        h = self.conv_in(sample)
        if feature.shape[1:3] != h.shape[1:3]:
            raise ValueError(f"{where} latent size {sample.shape[1:3]} (DR-net output {feature.shape[1:3]})")
        h = h + feature
        h, skips = self.run_down(h, temb, context)
        h = self.mid_block(h, temb, context)

        down_res = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips)]
        mid_res = self.controlnet_mid_block(h)

        scale = jnp.asarray(conditioning_scale, jnp.float32)
        if guess_mode and not self.global_pool_conditions:
            # diffusers: 0.1 … 1.0 over the down residuals, the last (1.0) for mid.
            scales = jnp.logspace(-1.0, 0.0, len(down_res) + 1, dtype=jnp.float32) * scale
            down_res = [r * scales[i].astype(r.dtype) for i, r in enumerate(down_res)]
            mid_res = mid_res * scales[-1].astype(mid_res.dtype)
        else:
            down_res = [r * scale.astype(r.dtype) for r in down_res]
            mid_res = mid_res * scale.astype(mid_res.dtype)
        if self.global_pool_conditions:
            down_res = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in down_res]
            mid_res = jnp.mean(mid_res, axis=(1, 2), keepdims=True)
        return (rgbs if self.return_rgbs else None), down_res, mid_res

    def init_inputs(self, batch: int = 1) -> dict:
        """Dummy kwargs for `init` / `eval_shape` (smallest latent that survives every downsample)."""
        size = 2 ** (self.n_blocks - 1)
        image = size * self.cond_downscale
        return dict(sample=jnp.zeros((batch, size, size, self.in_channels), self.dtype),
                    timestep=jnp.zeros((batch,), jnp.int32), encoder_hidden_states=self.dummy_context(batch),
                    controlnet_cond=jnp.zeros((batch, image, image, self.conditioning_channels), self.dtype))


CONTROLNET_RULES = dict(TRUNK_RULES, **{
    "controlnet_conditioning_channel_order": one_of("rgb", "bgr"),
    "conditioning_channels": lambda v: isinstance(v, int) and v > 0,
    "conditioning_embedding_out_channels": lambda v: v is None or len(v) >= 2,
})


def from_config(config: Mapping[str, Any], *, dtype=jnp.float32, param_dtype=jnp.float32) -> ControlNetModel:
    """Build the ControlNet from a diffusers/PASD `controlnet/config.json` dict."""
    check_supported(config, CONTROLNET_RULES, "ControlNetModel")
    return ControlNetModel(**module_kwargs(ControlNetModel, config, dtype=dtype, param_dtype=param_dtype))


# UNet config keys that diffusers `ControlNetModel.from_unet` carries over.
_FROM_UNET_KEYS = (
    "encoder_hid_dim", "encoder_hid_dim_type", "addition_embed_type", "addition_time_embed_dim",
    "transformer_layers_per_block", "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types",
    "only_cross_attention", "block_out_channels", "layers_per_block", "downsample_padding",
    "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
    "attention_head_dim", "num_attention_heads", "use_linear_projection", "class_embed_type",
    "num_class_embeds", "upcast_attention", "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim", "mid_block_type",
)


def controlnet_config_from_unet(unet_config: Mapping[str, Any], **overrides: Any) -> dict:
    """ControlNet config dict for `ControlNetModel.from_unet(unet)` (PASD training, §6).

    Copies the trunk keys present in `unet_config`, adds PASD's defaults (DR channels
    (16, 32, 96, 256), rgb order, `return_rgbs` True, `use_rrdb` False), then `overrides`.
    """
    config: dict = {"_class_name": "ControlNetModel"}
    config.update({k: _jsonable(unet_config[k]) for k in _FROM_UNET_KEYS if k in unet_config})
    config.update(conditioning_channels=3, conditioning_embedding_out_channels=[16, 32, 96, 256],
                  controlnet_conditioning_channel_order="rgb", global_pool_conditions=False,
                  return_rgbs=True, use_rrdb=False)
    config.update({k: _jsonable(v) for k, v in overrides.items()})
    return config


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def is_trunk_param(top_level_name: str) -> bool:
    """True for the ControlNet params shared with the UNet (`conv_in`, `time_embedding`,
    `down_blocks_*`, `mid_block`)."""
    return _TRUNK_PARAM_RE.fullmatch(top_level_name) is not None


def controlnet_params_from_unet(unet_params: Mapping, controlnet_params: Mapping) -> dict:
    """diffusers `ControlNetModel.from_unet` for parameter trees.

    Takes `conv_in`, `time_embedding`, `down_blocks_*` and `mid_block` from `unet_params` (a stock or
    PASD UNet tree; the same arrays, not copies) and everything else (DR net, zero convs) from
    `controlnet_params`, a freshly initialised ControlNet tree of the matching config. Both are bare
    param trees (no "params" wrapper). Raises ValueError when a trunk entry differs in structure/shape.
    """
    out = dict(controlnet_params)
    for key in controlnet_params:
        if not is_trunk_param(key):
            continue
        if key not in unet_params:
            raise ValueError(f"UNet params have no {key!r} to copy into the ControlNet")
        src, dst = unet_params[key], controlnet_params[key]
        src_shapes = jax.tree_util.tree_map(jnp.shape, src)
        dst_shapes = jax.tree_util.tree_map(jnp.shape, dst)
        if jax.tree_util.tree_structure(src) != jax.tree_util.tree_structure(dst) or src_shapes != dst_shapes:
            raise ValueError(f"UNet {key!r} does not match the ControlNet's (different config?)")
        out[key] = jax.tree_util.tree_map(
            lambda s, d: s if s.dtype == d.dtype else jnp.asarray(s, d.dtype), src, dst)
    return out
