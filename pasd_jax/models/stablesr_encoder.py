"""StableSR's time-aware encoder (`EncoderUNetModelWT`) in Flax linen, NHWC.

Mirrors `openaimodel.py: EncoderUNetModelWT` (STABLESR_REFERENCE §5): the down half of an ADM UNet
on the LR latent plus one output ResBlock (`fea_tran_i`) per scale. Module paths follow the LDM
state dict (`input_blocks_1_0`, `middle_block_1`, `fea_tran_2`), the leaves inside reuse our
blocks, so the converter renames only inside them (`convert.stablesr`):

* ResBlock = `ResnetBlock2D` (`in_layers.0/2 → norm1/conv1`, `emb_layers.1 → time_emb_proj`,
  `out_layers.0/3 → norm2/conv2`, `skip_connection → conv_shortcut`); GroupNorm32 eps 1e-5, and
  the reference's out-norm quirk: C groups when C % 32 ≠ 0 (`groups_out`).
* Downsample = `Downsample2D(padding=1)` (`op → conv`), symmetric padding as the UNet's.
* time embedding = `TimestepEmbedding` (`time_embed.0/2 → linear_1/2`) on `[cos, sin]` features.
* `AttentionBlock` (below) differs from our transformer attention: legacy head-major q|k|v split of
  a 1×1 `qkv` projection, q and k both scaled by ch^-1/4, GroupNorm32 eps 1e-5, no cross attention.

Forward: features are the inputs of the width-changing (downsampling) blocks plus the middle
block output; `fea_tran_i` maps each to `out_channels`; the result is `{str(width): feature}`.
x: [B, h, w, in_channels] (the LR latent), timesteps [B] -> dict of [B, h_l, w_l, out_channels].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from pasd_jax.models.configs import UnsupportedConfigError
from pasd_jax.nn.embeddings import TimestepEmbedding, timestep_features
from pasd_jax.nn.resnet import Downsample2D, ResnetBlock2D, conv2d, group_norm


class AttentionBlock(nn.Module):
    """Mirrors ADM `AttentionBlock` with `QKVAttentionLegacy` (use_new_attention_order False).

    tokens = GN32(x) flattened row-major; `qkv` Dense C → 3C whose channels are head-major
    ([q_n | k_n | v_n] for head n, ch = C/heads each); weights = softmax((q·s)(k·s)ᵀ), s = ch^-1/4,
    in float32; `proj_out` Dense C → C; `x + out`. x: [B, H, W, C] -> same.
    """

    channels: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.norm = group_norm(32, 1e-5, **kw)
        self.qkv = nn.Dense(3 * self.channels, **kw)
        self.proj_out = nn.Dense(self.channels, **kw)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, h, w, c = x.shape
        heads, ch = self.num_heads, c // self.num_heads
        qkv = self.qkv(self.norm(x).reshape(b, h * w, c)).reshape(b, h * w, heads, 3, ch)
        scale = 1.0 / (ch ** 0.25)
        q, k, v = qkv[:, :, :, 0] * scale, qkv[:, :, :, 1] * scale, qkv[:, :, :, 2]
        weight = jax.nn.softmax(jnp.einsum("bthc,bshc->bhts", q, k).astype(jnp.float32), axis=-1)
        out = jnp.einsum("bhts,bshc->bthc", weight.astype(v.dtype), v).reshape(b, h * w, c)
        return x + self.proj_out(out).reshape(b, h, w, c)


class EncoderUNetModelWT(nn.Module):
    """Mirrors `EncoderUNetModelWT` (fields are its yaml params; module docstring)."""

    in_channels: int = 4
    model_channels: int = 256
    out_channels: int = 256
    num_res_blocks: int = 2
    attention_resolutions: Tuple[int, ...] = (4, 2, 1)
    channel_mult: Tuple[int, ...] = (1, 1, 2, 2)
    num_heads: int = 4
    num_head_channels: int = -1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _heads(self, ch: int) -> int:
        return self.num_heads if self.num_head_channels == -1 else ch // self.num_head_channels

    def _resblock(self, cin: int, cout: int) -> ResnetBlock2D:
        return ResnetBlock2D(cin, cout, 4 * self.model_channels, groups=32,
                             groups_out=32 if cout % 32 == 0 else cout, eps=1e-5,
                             dtype=self.dtype, param_dtype=self.param_dtype)

    def feature_channels(self) -> list[int]:
        """Channels of the collected features (`input_block_chans` of the reference's forward)."""
        mult = self.channel_mult
        return [self.model_channels * m for m in mult[:-1]] + [self.model_channels * mult[-1]]

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mc = self.model_channels
        self.time_embed = TimestepEmbedding(4 * mc, **kw)
        blocks, ch, ds = [[conv2d(mc, 3, **kw)]], mc, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                layers = [self._resblock(ch, mult * mc)]
                ch = mult * mc
                if ds in self.attention_resolutions:
                    layers.append(AttentionBlock(ch, self._heads(ch), **kw))
                blocks.append(layers)
            if level != len(self.channel_mult) - 1:
                blocks.append([Downsample2D(ch, padding=1, **kw)])
                ds *= 2
        self.input_blocks = blocks
        self.middle_block = [self._resblock(ch, ch), AttentionBlock(ch, self._heads(ch), **kw),
                             self._resblock(ch, ch)]
        self.fea_tran = [self._resblock(c, self.out_channels) for c in self.feature_channels()]

    @staticmethod
    def _run(layers, h, emb):
        for layer in layers:
            h = layer(h, emb) if isinstance(layer, ResnetBlock2D) else layer(h)
        return h

    def __call__(self, x: jnp.ndarray, timesteps: jnp.ndarray) -> dict[str, jnp.ndarray]:
        t = jnp.broadcast_to(jnp.atleast_1d(jnp.asarray(timesteps)), (x.shape[0],))
        emb = self.time_embed(timestep_features(t, self.model_channels).astype(self.dtype))
        h, feats = x.astype(self.dtype), []
        for layers in self.input_blocks:
            new = self._run(layers, h, emb)
            if new.shape[2] != h.shape[2]:  # a width-changing block: keep its input (reference forward)
                feats.append(h)
            h = new
        feats.append(self._run(self.middle_block, h, emb))
        if len(feats) != len(self.fea_tran):
            raise ValueError(f"latent {x.shape[1:3]} too small: {len(feats)} features for "
                             f"{len(self.fea_tran)} fea_tran blocks")
        return {str(f.shape[2]): tran(f, emb) for f, tran in zip(feats, self.fea_tran)}

    def init_inputs(self, batch: int = 1) -> dict:
        size = 2 ** (len(self.channel_mult) - 1)
        return dict(x=jnp.zeros((batch, size, size, self.in_channels), self.dtype),
                    timesteps=jnp.zeros((batch,), jnp.int32))


ENCODER_FIELDS = ("in_channels", "model_channels", "out_channels", "num_res_blocks", "attention_resolutions",
                  "channel_mult", "num_heads", "num_head_channels")


def config_from_ldm(params: Mapping[str, Any]) -> dict:
    """Our config dict from `structcond_stage_config.params` of a StableSR yaml; options the
    released model does not use (scale-shift norm, resblock up/down, new attention order) are refused."""
    for key in ("use_scale_shift_norm", "resblock_updown", "use_new_attention_order"):
        if params.get(key):
            raise UnsupportedConfigError(f"EncoderUNetModelWT: {key} is not supported")
    if params.get("num_heads_upsample", -1) not in (-1, None) or int(params.get("dims", 2)) != 2:
        raise UnsupportedConfigError("EncoderUNetModelWT: only dims 2 and num_heads_upsample -1 are supported")
    defaults = EncoderUNetModelWT()
    config = {k: params.get(k, getattr(defaults, k)) for k in ENCODER_FIELDS}
    config["attention_resolutions"] = [int(v) for v in config["attention_resolutions"]]
    config["channel_mult"] = [int(v) for v in config["channel_mult"]]
    return config


def from_config(config: Mapping[str, Any], *, dtype=jnp.float32, param_dtype=jnp.float32) -> EncoderUNetModelWT:
    unknown = sorted(set(config) - set(ENCODER_FIELDS) - {"_class_name"})
    if unknown:
        raise UnsupportedConfigError(f"EncoderUNetModelWT: unknown config keys {unknown}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in ENCODER_FIELDS}
    return EncoderUNetModelWT(**kwargs, dtype=dtype, param_dtype=param_dtype)
