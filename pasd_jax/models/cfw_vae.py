"""StableSR's CFW autoencoder (`AutoencoderKLResi`) and the SR model's encoder-only first stage.

Mirrors `ldm/models/autoencoder.py: AutoencoderKLResi` with `model.py: Encoder(return_fea=True)`,
`Decoder_Mix` and `Fuse_sft_block_RRDB` (STABLESR_REFERENCE §6). Built on our diffusers-layout VAE
(`pasd_jax.models.vae`: same ResnetBlock / attention / asymmetric-pad Downsample numerics, GN eps
1e-6, swish); the converter maps the LDM names with the SD single-file VAE table.

* `CFWEncoder`: our `Encoder`, also returning `enc_fea` = the last resnet output of every level
  1..n−2 *before* its downsample (levels 1 and 2 of the 4-level release: 2C at H/2, 4C at H/4).
* `DecoderMix`: our `Decoder` plus `fusion_layer_{l}` for the LDM levels l = n−2..1 (diffusers up
  block n−1−l), applied after that level's resnets and before its upsampler:
  `h = h + w·fuse(enc_fea[l−1], h)`, w = `fusion_w` (the scripts' `--dec_w`; 0 gives the plain
  decoder, the fusion branch still computed). w is a call argument here, not a module attribute.
* `FuseSFTBlockRRDB`: `encode_enc_1` (ResBlock 2C → C on `concat(enc, dec)`, 1×1 shortcut
  `conv_out` in the reference, `conv_shortcut` here), `encode_enc_2_{i}` (RRDB, 32 growth),
  `encode_enc_3` (ResBlock C → C); no time embedding.
* `FirstStageEncoder`: encoder + `quant_conv` only — the SR checkpoint's own `first_stage_model`,
  used by the canvas/tile scripts to encode; its decoder is never used by any script and is not
  converted (`convert.stablesr` drops it by name).

Images NHWC in [−1, 1]; moments [B, H/2^k, W/2^k, 2·latent] (= reference `posterior.parameters`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Tuple

import flax.linen as nn
import jax.numpy as jnp

from pasd_jax.models.configs import UnsupportedConfigError
from pasd_jax.models.vae import VAE_EPS, Decoder, Encoder
from pasd_jax.nn.resnet import ResnetBlock2D, conv2d
from pasd_jax.nn.rrdb import RRDB


def fused_levels(n_levels: int) -> list[int]:
    """LDM level indices with a fusion layer / an encoder feature: 1 .. n−2 (release: [1, 2])."""
    return list(range(1, n_levels - 1))


class CFWEncoder(Encoder):
    """`Encoder` that also returns the per-level features (module docstring)."""

    def __call__(self, x: jnp.ndarray):
        keep = set(fused_levels(len(self.block_out_channels)))
        h, feats = self.conv_in(x), []
        for level, block in enumerate(self.down_blocks):
            for resnet in block.resnets:
                h = resnet(h)
            if level in keep:
                feats.append(h)
            if block.add_downsample:
                h = block.downsamplers[0](h)
        h = self.mid_block(h)
        return self.conv_out(nn.silu(self.conv_norm_out(h))), feats


class FuseSFTBlockRRDB(nn.Module):
    """Mirrors `Fuse_sft_block_RRDB(C, C, num_block)`: returns the fused feature (before ·w)."""

    channels: int
    num_block: int = 2
    groups: int = 32
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = self.channels
        self.encode_enc_1 = ResnetBlock2D(2 * c, c, None, groups=self.groups, eps=VAE_EPS, **kw)
        self.encode_enc_2 = [RRDB(c, 32, **kw) for _ in range(self.num_block)]
        self.encode_enc_3 = ResnetBlock2D(c, c, None, groups=self.groups, eps=VAE_EPS, **kw)

    def __call__(self, enc_feat: jnp.ndarray, dec_feat: jnp.ndarray) -> jnp.ndarray:
        f = self.encode_enc_1(jnp.concatenate([enc_feat.astype(dec_feat.dtype), dec_feat], axis=-1))
        for rrdb in self.encode_enc_2:
            f = rrdb(f)
        return self.encode_enc_3(f)


class DecoderMix(Decoder):
    """Mirrors `Decoder_Mix` (module docstring); `__call__(z, enc_fea, fusion_w)`."""

    num_fuse_block: int = 2

    def setup(self):
        super().setup()
        n, kw = len(self.block_out_channels), dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for level in fused_levels(n):
            setattr(self, f"fusion_layer_{level}",
                    FuseSFTBlockRRDB(self.block_out_channels[level], self.num_fuse_block, self.norm_num_groups, **kw))

    def __call__(self, z: jnp.ndarray, enc_fea: Sequence[jnp.ndarray] = (), fusion_w=0.0) -> jnp.ndarray:
        n = len(self.block_out_channels)
        if len(enc_fea) != len(fused_levels(n)):
            raise ValueError(f"DecoderMix needs {len(fused_levels(n))} encoder features, got {len(enc_fea)}")
        h = self.mid_block(self.conv_in(z))
        for i, block in enumerate(self.up_blocks):
            level = n - 1 - i
            for resnet in block.resnets:
                h = resnet(h)
            if level in fused_levels(n):
                fuse = getattr(self, f"fusion_layer_{level}")
                h = h + jnp.asarray(fusion_w, h.dtype) * fuse(enc_fea[level - 1], h)
            if block.add_upsample:
                h = block.upsamplers[0](h)
        return self.conv_out(nn.silu(self.conv_norm_out(h)))


class _KLFields(nn.Module):
    """Config fields shared by the two autoencoders (our `AutoencoderKL` names)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    scaling_factor: float = 0.18215
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _common(self) -> dict:
        return dict(block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
                    norm_num_groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
                    dtype=self.dtype, param_dtype=self.param_dtype)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def init_inputs(self, batch: int = 1) -> dict:
        return dict(x=jnp.zeros((batch, self.downscale, self.downscale, self.in_channels), self.dtype))


class AutoencoderKLResi(_KLFields):
    """Mirrors `AutoencoderKLResi`: `encode(x) -> (moments, enc_fea)`, `decode(z, enc_fea, w)`."""

    num_fuse_block: int = 2

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = CFWEncoder(self.in_channels, self.latent_channels, **self._common())
        self.decoder = DecoderMix(self.out_channels, num_fuse_block=self.num_fuse_block, **self._common())
        self.quant_conv = conv2d(2 * self.latent_channels, 1, **kw)
        self.post_quant_conv = conv2d(self.latent_channels, 1, **kw)

    def encode(self, x: jnp.ndarray):
        """x [B, H, W, 3] -> (moments float32 [B, h, w, 2·latent] = [mean | logvar] unclamped, enc_fea)."""
        h, feats = self.encoder(x.astype(self.dtype))
        return self.quant_conv(h).astype(jnp.float32), feats

    def decode(self, z: jnp.ndarray, enc_fea: Sequence[jnp.ndarray], fusion_w=0.5) -> jnp.ndarray:
        """Unscaled latent z [B, h, w, latent] (the scripts' `samples / 0.18215`) -> image float32."""
        return self.decoder(self.post_quant_conv(z.astype(self.dtype)), enc_fea, fusion_w).astype(jnp.float32)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        moments, feats = self.encode(x)
        return self.decode(moments[..., :self.latent_channels], feats, 1.0)


class FirstStageEncoder(_KLFields):
    """Encoder + quant_conv of the SR model's `first_stage_model` (module docstring)."""

    def setup(self):
        self.encoder = Encoder(self.in_channels, self.latent_channels, **self._common())
        self.quant_conv = conv2d(2 * self.latent_channels, 1, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x [B, H, W, 3] -> moments float32 [B, h, w, 2·latent] ([mean | logvar], unclamped)."""
        return self.quant_conv(self.encoder(x.astype(self.dtype))).astype(jnp.float32)


def split_moments(moments: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`DiagonalGaussianDistribution`: (mean, std) with logvar clamped to [−30, 20]."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))


KL_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
             "norm_num_groups", "mid_block_add_attention", "scaling_factor")


def config_from_ddconfig(dd: Mapping[str, Any], embed_dim: int, *, cfw: bool) -> dict:
    """Our config from an LDM `ddconfig` (+ `num_fuse_block` for the CFW decoder)."""
    if list(dd.get("attn_resolutions", [])):
        raise UnsupportedConfigError("StableSR autoencoder with attn_resolutions is not supported")
    if not dd.get("double_z", True) or int(dd["z_channels"]) != int(embed_dim):
        raise UnsupportedConfigError("StableSR autoencoder: need double_z and z_channels == embed_dim")
    config = {"in_channels": int(dd.get("in_channels", 3)), "out_channels": int(dd.get("out_ch", 3)),
              "block_out_channels": [int(dd["ch"]) * int(m) for m in dd["ch_mult"]],
              "layers_per_block": int(dd["num_res_blocks"]), "latent_channels": int(embed_dim)}
    if cfw:
        config["num_fuse_block"] = int(dd.get("num_fuse_block", 2))
    return config


def from_config(config: Mapping[str, Any], *, cfw: bool, dtype=jnp.float32, param_dtype=jnp.float32):
    fields = KL_FIELDS + (("num_fuse_block",) if cfw else ())
    unknown = sorted(set(config) - set(fields) - {"_class_name"})
    if unknown:
        raise UnsupportedConfigError(f"{'AutoencoderKLResi' if cfw else 'FirstStageEncoder'}: unknown config "
                                     f"keys {unknown}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
    cls = AutoencoderKLResi if cfw else FirstStageEncoder
    return cls(**kwargs, dtype=dtype, param_dtype=param_dtype)
