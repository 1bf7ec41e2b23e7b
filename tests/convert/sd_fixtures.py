"""Tiny PyTorch SD pipelines for converter tests: a diffusers folder and the same weights as an
original-LDM single file.

The LDM file is written from the diffusers state dicts through the *inverse* of `convert.ldm`'s
prefix tables (plus OpenCLIP's fused q/k/v), and `ldm_roundtrip_via_diffusers` checks it with
diffusers' own `single_file_utils.convert_ldm_*` functions, the independent oracle: they must map
the file back onto exactly the diffusers state dicts.

Widths keep SD's tells (cross-attention context 768 for SD1, 1024 for SD2) but everything else is
toy-sized, so a whole pipeline builds in well under a second.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np

from convert import ldm
from pasd_jax.assembly import defaults
from pasd_jax.fixtures import diffusers_kwargs, tiny

torch = None  # imported by `_torch()` so that collecting this module never needs torch


def _torch():
    global torch
    import torch as torch_module

    torch = torch_module
    return torch


def unet_config(model_type: str = "sd1") -> dict:
    """The tiny smoke-model UNet layout with SD's context width and 32 norm groups."""
    config = diffusers_kwargs(tiny.tiny_unet_config("stock"))
    config.update(cross_attention_dim=768 if model_type == "sd1" else 1024, norm_num_groups=32,
                  attention_head_dim=8 if model_type == "sd1" else 2, use_linear_projection=model_type == "sd2")
    return config


def vae_config() -> dict:
    return dict(tiny.tiny_vae_config(), block_out_channels=[32, 32, 32, 32], norm_num_groups=32)


def text_config(model_type: str = "sd1") -> dict:
    width = 768 if model_type == "sd1" else 1024
    return dict(tiny.tiny_text_config(), hidden_size=width, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=width // 64, hidden_act="quick_gelu" if model_type == "sd1" else "gelu")


def make_torch_pipeline(model_type: str = "sd1", seed: int = 0) -> dict:
    """{"unet", "vae", "text_encoder"} -> seeded torch modules (eval mode), norms randomised."""
    _torch()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tests.torch_oracle import randomize_norms

    torch.manual_seed(seed)
    modules = {"unet": UNet2DConditionModel(**unet_config(model_type)), "vae": AutoencoderKL(**vae_config()),
               "text_encoder": CLIPTextModel(CLIPTextConfig(**{k: v for k, v in text_config(model_type).items()
                                                                if k != "architectures"}))}
    for i, module in enumerate(modules.values()):
        randomize_norms(module, seed + i)
        module.eval()
    return modules


def save_diffusers_folder(modules: dict, folder, prediction_type: str = "epsilon") -> str:
    """`save_pretrained` every module into `folder/<name>`, plus tokenizer/, scheduler/ and
    model_index.json: what a user downloads as a diffusers SD pipeline."""
    folder = os.fspath(folder)
    for name, module in modules.items():
        module.save_pretrained(os.path.join(folder, name))
    tiny.write_tiny_tokenizer(os.path.join(folder, "tokenizer"))
    os.makedirs(os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(dict(defaults.SCHEDULER, prediction_type=prediction_type), f)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline"}, f)
    return folder


def diffusers_state(module) -> dict:
    """A module's state dict as saved (float32 numpy; CLIP keys with `text_model.`)."""
    state = {k: v.detach().float().numpy().copy() for k, v in module.state_dict().items()}
    if any(k.startswith("encoder.layers.") or k.startswith("embeddings.") for k in state):
        state = {f"text_model.{k}": v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.endswith("position_ids")}


def _to_ldm(state: dict, table: dict, prefix: str, squeeze_attention: bool = False) -> dict:
    inverse, out = ldm.invert(table), {}
    for key, value in state.items():
        if ".Conv2d_0." in key:  # diffusers' legacy alias of the sampler conv
            continue
        new = ldm.map_key(key, inverse)
        assert new is not None, key
        if squeeze_attention and ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM stores the VAE attention projections as 1x1 convs
        out[prefix + new] = value
    return out


def ldm_single_file_state(modules: dict, model_type: str = "sd1", *, ema: bool = False,
                          dtype=np.float32) -> dict:
    """The pipeline's weights in the original LDM single-file layout (our inverse map)."""
    unet = diffusers_state(modules["unet"])
    vae = diffusers_state(modules["vae"])
    text = diffusers_state(modules["text_encoder"])
    out = _to_ldm(unet, ldm.unet_table(unet_config(model_type)), ldm.UNET_PREFIX)
    out.update(_to_ldm(vae, ldm.vae_table(vae_config()), ldm.VAE_PREFIX, squeeze_attention=True))
    if model_type == "sd1":
        out.update({ldm.CLIP_PREFIX + k: v for k, v in text.items()})
    else:
        out.update(open_clip_state(text, text_config(model_type)["num_hidden_layers"]))
    if ema:  # the LDM trainer's EMA copy: flat names, here distinct values
        for key in [k for k in out if k.startswith(ldm.UNET_PREFIX)]:
            out[ldm.EMA_PREFIX + key[len("model."):].replace(".", "")] = out[key] * 0.5
        out["model_ema.decay"] = np.array(0.9999, np.float32)
    return {k: np.ascontiguousarray(v.astype(dtype)) for k, v in out.items()}


def open_clip_state(text: dict, num_layers: int) -> dict:
    """transformers CLIP names -> OpenCLIP names: fused in_proj, plus SD2's unused last resblock and
    the text projection (both dropped by the converter)."""
    inverse, out = ldm.invert(ldm.open_clip_table(num_layers)), {}
    for key, value in text.items():
        for leaf in ("weight", "bias"):
            if key.endswith(f"self_attn.q_proj.{leaf}"):
                base = key[: -len(f"q_proj.{leaf}")]
                value = np.concatenate([text[f"{base}{n}_proj.{leaf}"] for n in "qkv"])
                key = f"{base}in_proj.{leaf}"
        if ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue
        new = ldm.map_key(key, inverse)
        assert new is not None, key
        out[ldm.OPEN_CLIP_PREFIX + new] = value
    last = {k.replace(f"resblocks.{num_layers - 1}.", f"resblocks.{num_layers}."): v + 1
            for k, v in out.items() if f"resblocks.{num_layers - 1}." in k}
    out.update(last)
    width = text["text_model.final_layer_norm.weight"].shape[0]
    out[ldm.OPEN_CLIP_PREFIX + "text_projection"] = np.eye(width, dtype=np.float32)
    return out


def ldm_roundtrip_via_diffusers(ldm_state: dict, model_type: str = "sd1") -> dict:
    """diffusers' single-file converters applied to our LDM dict -> {"unet", "vae", "text_encoder"}
    torch-named numpy state dicts (the oracle)."""
    _torch()
    from diffusers.loaders import single_file_utils as sfu

    checkpoint = {k: torch.from_numpy(np.array(v)) for k, v in ldm_state.items()}
    unet = sfu.convert_ldm_unet_checkpoint(checkpoint, unet_config(model_type))
    vae = sfu.convert_ldm_vae_checkpoint(checkpoint, vae_config())
    if model_type == "sd1":
        text = sfu.convert_ldm_clip_checkpoint(checkpoint)
    else:
        class _Model:  # convert_open_clip_checkpoint reads only config.hidden_size
            config = type("C", (), {"hidden_size": text_config(model_type)["hidden_size"]})()

        keep = {k: v for k, v in checkpoint.items()
                if f"resblocks.{text_config(model_type)['num_hidden_layers']}." not in k}
        text = sfu.convert_open_clip_checkpoint(_Model(), keep)
        text.pop("text_projection.weight", None)
    as_numpy = lambda d: {k: v.float().numpy() for k, v in d.items()}  # noqa: E731
    return {"unet": as_numpy(unet), "vae": as_numpy(vae), "text_encoder": as_numpy(text)}


def save_single_file(state: dict, path, extras: dict | None = None) -> str:
    """Write an LDM dict as `.safetensors` (numpy writer) or `.ckpt` (torch.save, Lightning-style
    `{"state_dict": ..., "global_step": ...}`)."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file(state, path)
    else:
        _torch()
        torch_state = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
        torch.save({"state_dict": torch_state, **copy.deepcopy(extras or {})}, path)
    return path
