"""Test helper: write random StableSR weights in the ORIGINAL key names (+ yaml configs) for any config.

The inverse of `convert.stablesr_layout`: our parameter trees -> torch-style names (`flax_to_torch`)
-> LDM names through the inverted prefix tables, with the original layouts (Conv1d [O, I, 1] for the
encoder attention, 1×1-conv VAE attention, `conv_out` shortcut in the CFW fusion ResBlock). Used to
build golden-layout folders with other architectures than the dev set (the hidden set's shape).
"""

from __future__ import annotations

import re

import numpy as np
import yaml
from safetensors.numpy import save_file

from convert import ldm, stablesr_layout
from convert.mapping import flax_to_torch
from pasd_jax.assembly.stablesr import abstract_params, build_module

_ENCODER_BACK = [(re.compile(r"(^|\.)" + re.escape(b) + r"\."), r"\1" + a + ".") for a, b in (
    ("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"),
    ("op", "conv"), ("time_embed.0", "time_embed.linear_1"), ("time_embed.2", "time_embed.linear_2"))]


def random_params(component: str, config: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)

    def leaf(spec, name):
        if name == "scale":
            return (1 + 0.1 * rng.standard_normal(spec.shape)).astype(np.float32)
        if name == "bias":
            return (0.1 * rng.standard_normal(spec.shape)).astype(np.float32)
        fan_in = int(np.prod(spec.shape[:-1])) if len(spec.shape) > 1 else 1
        return (rng.standard_normal(spec.shape) / np.sqrt(fan_in)).astype(np.float32)

    def walk(tree):
        return {k: walk(v) if isinstance(v, dict) else leaf(v, k) for k, v in tree.items()}

    return walk(abstract_params(build_module(component, config)))


def _vae_attention(key: str, value: np.ndarray) -> np.ndarray:
    if ".mid.attn_1." in key and key.endswith(".weight") and not key.split(".mid.attn_1.")[1].startswith("norm"):
        return value[:, :, None, None]
    return value


def ldm_state(configs: dict, params: dict) -> tuple[dict, dict]:
    """(SR checkpoint state dict, CFW state dict) in the original names and layouts."""
    sr = {}
    unet_inv = ldm.invert(stablesr_layout.unet_table(configs["unet"]))
    for key, value in flax_to_torch(params["unet"]).items():
        sr[ldm.UNET_PREFIX + ldm.map_key(key, unet_inv)] = value
    for key, value in flax_to_torch(params["struct_encoder"]).items():
        for pattern, repl in _ENCODER_BACK:
            key = pattern.sub(repl, key)
        if re.search(r"\.(qkv|proj_out)\.weight$", key):
            value = value[:, :, None]
        sr[stablesr_layout.ENCODER_PREFIX + key] = value
    vae_inv = ldm.invert(ldm.vae_table(configs["first_stage"]))
    for key, value in flax_to_torch(params["first_stage"]).items():
        key = ldm.map_key(key, vae_inv)
        sr[ldm.VAE_PREFIX + key] = _vae_attention(key, value)
    sr["betas"] = np.linspace(1e-4, 2e-2, 1000).astype(np.float32)  # dropped by name
    cfw = {}
    cfw_inv = ldm.invert(ldm.vae_table(configs["cfw"]))
    for key, value in flax_to_torch(params["cfw"]).items():
        # flax_to_torch splits `fusion_layer_1` / `encode_enc_1` like list indices: join them back
        key = re.sub(r"fusion_layer\.(\d+)\.", r"fusion_layer_\1.", key)
        key = re.sub(r"\.encode_enc\.([13])\.", r".encode_enc_\1.", key)
        if key.startswith("decoder.fusion_layer_"):
            cfw[key.replace(".encode_enc_1.conv_shortcut.", ".encode_enc_1.conv_out.")] = value
        else:
            mapped = ldm.map_key(key, cfw_inv)
            if mapped is None:
                raise KeyError(f"no LDM name for CFW key {key}")
            cfw[mapped] = _vae_attention(mapped, value)
    return sr, cfw


def yaml_configs(unet: dict, encoder: dict, vae: dict, cfw: dict, image_size: int) -> tuple[str, str]:
    """(SR yaml, CFW yaml) texts in the layout of the released configs."""
    dd = lambda c: {"double_z": True, "z_channels": 4, "resolution": 512, "in_channels": 3, "out_ch": 3,  # noqa: E731
                    "attn_resolutions": [], "dropout": 0.0, **c}
    sr = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusionSRTextWT", "params": {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "image_size": image_size,
        "scale_factor": 0.18215,
        "unet_config": {"target": "UNetModelDualcondV2", "params": dict(unet, use_spatial_transformer=True,
                                                                        transformer_depth=1, legacy=False)},
        "first_stage_config": {"target": "AutoencoderKL", "params": {"embed_dim": 4, "ddconfig": dd(vae)}},
        "structcond_stage_config": {"target": "EncoderUNetModelWT", "params": encoder}}}}
    c = {"model": {"target": "ldm.models.autoencoder.AutoencoderKLResi",
                   "params": {"embed_dim": 4, "fusion_w": 1.0, "ddconfig": dd(cfw)}}}
    return yaml.safe_dump(sr), yaml.safe_dump(c)


def write_weights(folder, configs: dict, params: dict, yamls: tuple[str, str]) -> dict:
    """Write weights/*.safetensors + *.yaml into folder; returns the manifest's `weights` entry."""
    w = folder / "weights"
    w.mkdir(parents=True, exist_ok=True)
    sr, cfw = ldm_state(configs, params)
    save_file(sr, w / "stablesr_sd.safetensors")
    save_file(cfw, w / "vqgan_cfw_sd.safetensors")
    (w / "stablesr_config.yaml").write_text(yamls[0])
    (w / "vqgan_cfw_config.yaml").write_text(yamls[1])
    return {"stablesr": "weights/stablesr_sd.safetensors", "stablesr_config": "weights/stablesr_config.yaml",
            "vqgan_cfw": "weights/vqgan_cfw_sd.safetensors", "vqgan_cfw_config": "weights/vqgan_cfw_config.yaml"}
