"""The tiny built-in *smoke model*: SD1.5-shaped PASD components small enough for a CPU.

Used by `sample.py --demo`, the `tiny` training config and tests. Every component has the
architecture of its SD1.5 counterpart (four UNet levels, 8× VAE, CLIP text encoder, PASD
ControlNet with the DR net) at toy widths, with seeded random weights, so the whole pipeline runs
in seconds but produces no meaningful restoration. The tokenizer is a byte-level CLIP BPE with no
merges (every byte is a token), written on the fly, so nothing has to be downloaded.

    make_tiny_pipeline(dst, family="pasd", seed=0)   # a converted folder sample.py loads
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from pasd_jax.models import registry, weights
from pasd_jax.models.controlnet import controlnet_config_from_unet, controlnet_params_from_unet

# Byte-level vocabulary: 256 bytes, each also with the end-of-word suffix, plus the two specials.
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
TINY_VOCAB_SIZE = 2 * 256 + 2
_ZERO_INIT = re.compile(r"controlnet_down_blocks|controlnet_mid_block|controlnet_cond_embedding/conv_out")

# SD1.5's scheduler (diffusers DDIMScheduler semantics), what PASD samples and trains with.
SD15_SCHEDULER = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    "prediction_type": "epsilon", "timestep_spacing": "leading", "trained_betas": None,
}


def tiny_unet_config(family: str = "pasd", levels: int = 4) -> dict:
    """SD1.5 UNet block layout at widths (32, 32, 64, 64); C_3 = C_2 as PASD's UpBlock2D PACA needs.

    `levels=2` gives a two-level (32, 32) variant that compiles several times faster (tests)."""
    if levels not in (2, 4):
        raise ValueError(f"levels must be 2 or 4, got {levels}")
    attn = levels - 1
    return {
        "_class_name": "UNet2DConditionModel", registry.FAMILY_KEY: family,
        "sample_size": 8, "in_channels": 4, "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"] * attn + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * attn,
        "block_out_channels": [32, 32, 64, 64] if levels == 4 else [32, 32],
        "layers_per_block": 1, "attention_head_dim": 2,
        "cross_attention_dim": 32, "norm_num_groups": 8, "norm_eps": 1e-5, "act_fn": "silu",
        "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1, "mid_block_scale_factor": 1,
        "use_linear_projection": False, "upcast_attention": False, "only_cross_attention": False,
    }


def tiny_controlnet_config(unet_config: Mapping[str, Any], use_rrdb: bool = False, levels: int = 4) -> dict:
    """`ControlNetModel.from_unet` of the tiny UNet, DR net channels (8, 16, 24, 32) (levels=2: (8, 16))."""
    return controlnet_config_from_unet(unet_config, conditioning_embedding_out_channels=[8, 16, 24, 32][:levels],
                                       use_rrdb=use_rrdb)


def tiny_vae_config(levels: int = 4) -> dict:
    """An 8× AutoencoderKL (four levels; levels=2: 2×), 4 latent channels, SD's scaling factor."""
    return {
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [16, 32, 32, 32][:levels], "layers_per_block": 1, "norm_num_groups": 8,
        "act_fn": "silu", "sample_size": 64, "scaling_factor": 0.18215,
    }


def tiny_text_config() -> dict:
    """A two-layer CLIP text encoder of width 32 over the byte-level vocabulary."""
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": TINY_VOCAB_SIZE,
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "max_position_embeddings": 77, "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu",
        "bos_token_id": TINY_VOCAB_SIZE - 2, "eos_token_id": TINY_VOCAB_SIZE - 1, "pad_token_id": TINY_VOCAB_SIZE - 1,
    }


def tiny_configs(family: str = "pasd", use_rrdb: bool = False, levels: int = 4) -> dict[str, dict]:
    """{"unet", "controlnet", "vae", "text_encoder"} -> config dict of the smoke model.

    `levels=2` is a faster-compiling test variant whose VAE and DR net downscale by 2, not 8."""
    unet = tiny_unet_config(family, levels)
    return {"unet": unet, "controlnet": tiny_controlnet_config(unet, use_rrdb, levels), "vae": tiny_vae_config(levels),
            "text_encoder": tiny_text_config()}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = dict(zip(printable, printable)), 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return {b: chr(c) for b, c in chars.items()}


def write_tiny_tokenizer(folder: str | os.PathLike) -> None:
    """Write a byte-level CLIP tokenizer (`vocab.json`, empty `merges.txt`, configs) into `folder`."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    chars = [_bytes_to_unicode()[b] for b in range(256)]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({BOS: 512, EOS: 513})
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": BOS,
                   "eos_token": EOS, "unk_token": EOS, "pad_token": EOS, "do_lower_case": True}, f, indent=2)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, f, indent=2)


def init_params(config: Mapping[str, Any], seed: int) -> dict:
    """Seeded random weights for one component, as numpy arrays (no XLA compile: seconds on a CPU).

    Shapes come from `jax.eval_shape` of the module's init; kernels and embeddings are
    N(0, 1/fan_in) (LeCun-normal-like), biases 0, norm scales 1. PASD's zero convolutions
    (`controlnet_down_blocks`, `controlnet_mid_block`, `controlnet_cond_embedding/conv_out`) stay 0.
    """
    abstract = registry.abstract_params(registry.build_module(config))
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        names = [getattr(k, "key", str(k)) for k in path]
        if names[-1] in ("bias", "scale") or _ZERO_INIT.search("/".join(names)):
            return np.full(spec.shape, 1.0 if names[-1] == "scale" else 0.0, np.float32)
        fan_in = int(np.prod(spec.shape[:-1])) if names[-1] == "kernel" else spec.shape[-1]
        return (rng.standard_normal(spec.shape) / np.sqrt(max(fan_in, 1))).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def make_tiny_pipeline(dst: str | os.PathLike, *, family: str = "pasd", use_rrdb: bool = False,
                       seed: int = 0, overwrite: bool = False, levels: int = 4) -> str:
    """Write the smoke model as a converted folder (what `python -m convert` makes of a pipeline).

    `dst/{unet,controlnet,vae,text_encoder}` (config.json + flax_params.safetensors),
    `dst/tokenizer`, `dst/scheduler/scheduler_config.json` and the `pasd_jax.json` manifest. The
    ControlNet starts from the UNet trunk (`from_unet`), zero convs at zero, as PASD training does.
    Atomic: nothing appears at `dst` unless everything was written. Returns `dst`.
    """
    dst = os.fspath(dst)
    weights.check_destination(dst, overwrite)  # fail before the work
    configs = tiny_configs(family, use_rrdb, levels)
    params = {name: init_params(cfg, seed + i) for i, (name, cfg) in enumerate(configs.items())}
    params["controlnet"] = controlnet_params_from_unet(params["unet"], params["controlnet"])
    with weights.staged_folder(dst, overwrite=overwrite) as staged:
        for name, cfg in configs.items():
            weights.save_converted(os.path.join(staged, name), cfg, params[name], component=name)
        write_tiny_tokenizer(os.path.join(staged, "tokenizer"))
        os.makedirs(os.path.join(staged, "scheduler"))
        with open(os.path.join(staged, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(SD15_SCHEDULER, f, indent=2)
        weights.write_manifest(staged, {
            "format_version": weights.FORMAT_VERSION, "source": "pasd_jax.models.tiny (smoke model)",
            "components": {n: {"family": family if n == "unet" else None} for n in configs},
            "copied": ["tokenizer", "scheduler"], "smoke_model": True})
    return dst
