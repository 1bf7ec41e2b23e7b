"""Load a converted StableSR folder (`python -m convert stablesr ...`) and the StableSR smoke model.

A converted StableSR folder is recognised by its manifest (`pasd_jax.json` with
`"model": "stablesr"`); `sample.py` uses `is_stablesr_folder` to pick the method. The smoke model
(`make_smoke_model`) is a tiny StableSR with seeded random weights (the dev goldens' tiny
architecture: 3-level SFT UNet of width 32, 8-channel encoder features, 4-level VAE/CFW of width
32) and a random empty-prompt context; it exercises every stage and restores nothing.
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import numpy as np
from safetensors.numpy import load_file

from convert.stablesr import COMPONENTS, CONTEXT_NAME, abstract_params, build_module, write_folder
from pasd_jax.models import home, weights
from pasd_jax.sampling.stablesr_pipeline import StableSRModels

SMOKE_BANNER = ("SMOKE MODEL: tiny built-in StableSR with random weights — this checks that the StableSR pipeline "
                "runs; the output is NOT a restoration. Use --ckpt with a converted StableSR model for real results.")


def _manifest(folder: str | os.PathLike) -> dict | None:
    path = pathlib.Path(folder) / weights.MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_stablesr_folder(folder: str | os.PathLike) -> bool:
    """True for a converted StableSR folder (manifest `"model": "stablesr"`)."""
    manifest = _manifest(folder)
    return bool(manifest) and manifest.get("model") == "stablesr"


def load_stablesr(folder: str | os.PathLike, *, context: np.ndarray | None = None) -> StableSRModels:
    """Modules + params of a converted StableSR folder. The empty-prompt context comes from the
    folder (`empty_context.safetensors`) unless given; a folder without one needs `context`."""
    folder = pathlib.Path(folder)
    manifest = _manifest(folder)
    if not manifest or manifest.get("model") != "stablesr":
        raise ValueError(f"{folder} is not a converted StableSR folder (no {weights.MANIFEST_NAME} with "
                         f'"model": "stablesr"; convert with `python -m convert stablesr SR_CKPT CFW_CKPT DST`)')
    modules, params = {}, {}
    for name in COMPONENTS:
        config, tree = weights.load_converted(folder / manifest["components"].get(name, name))
        modules[name] = build_module(name, {k: v for k, v in config.items() if k != weights.META_KEY})
        params[name] = tree
    if context is None:
        if not manifest.get("context"):
            raise ValueError(f"{folder} has no empty-prompt context (its SR checkpoint had no cond_stage_model.* "
                             f"text tower); reconvert from the full StableSR checkpoint")
        context = load_file(str(folder / manifest["context"]))["context"]
    models = StableSRModels(**modules, params=jax.device_put(params), sampling=dict(manifest["sampling"]),
                            context=np.asarray(context, np.float32))
    models.smoke = bool(manifest.get("smoke_model"))
    models.source = str(folder)
    return models


# ---- smoke model ---------------------------------------------------------------------------
SMOKE_CONFIGS = {
    "unet": {"_stablesr": True, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 32, 32],
             "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
             "attention_head_dim": [2, 2, 2], "cross_attention_dim": 16, "use_linear_projection": True,
             "semb_channels": 8},
    "struct_encoder": {"in_channels": 4, "model_channels": 32, "out_channels": 8, "num_res_blocks": 1,
                       "attention_resolutions": [2, 1], "channel_mult": [1, 1, 1], "num_heads": 4,
                       "num_head_channels": -1},
    "first_stage": {"in_channels": 3, "out_channels": 3, "block_out_channels": [32, 32, 32, 32],
                    "layers_per_block": 1, "latent_channels": 4},
    "cfw": {"in_channels": 3, "out_channels": 3, "block_out_channels": [32, 32, 32, 32], "layers_per_block": 1,
            "latent_channels": 4, "num_fuse_block": 1},
}
SMOKE_SAMPLING = {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "image_size": 64,
                  "scale_factor": 0.18215}


def _random_params(component: str, seed: int) -> dict:
    """N(0, 1/fan_in) kernels, zero biases, unit norm scales (numpy, no XLA compile)."""
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        name = getattr(path[-1], "key", str(path[-1]))
        if name in ("bias", "scale"):
            return np.full(spec.shape, 1.0 if name == "scale" else 0.0, np.float32)
        fan_in = int(np.prod(spec.shape[:-1])) if name == "kernel" else spec.shape[-1]
        return (rng.standard_normal(spec.shape) / np.sqrt(max(fan_in, 1))).astype(np.float32)

    module = build_module(component, SMOKE_CONFIGS[component])
    return jax.tree_util.tree_map_with_path(leaf, abstract_params(module))


def make_smoke_model(dst: str | os.PathLike, *, seed: int = 0, overwrite: bool = False) -> str:
    """Write the StableSR smoke model as a converted folder (atomic). Returns dst."""
    params = {name: _random_params(name, seed + i) for i, name in enumerate(COMPONENTS)}
    context = np.random.default_rng(seed + 99).standard_normal((1, 7, 16)).astype(np.float32)
    write_folder(os.fspath(dst), SMOKE_CONFIGS, params, context, overwrite=overwrite,
                 sources={"smoke": "pasd_jax.sampling.stablesr_loader (random weights)"},
                 extra={"smoke_model": True, "sampling": SMOKE_SAMPLING})
    return os.fspath(dst)


def smoke_model_dir() -> pathlib.Path:
    """The smoke model under the models home (created on first use)."""
    folder = home.models_home() / "demo" / "tiny_stablesr"
    if not is_stablesr_folder(folder):
        make_smoke_model(folder, overwrite=folder.exists())
    return folder


__all__ = ["CONTEXT_NAME", "SMOKE_BANNER", "is_stablesr_folder", "load_stablesr", "make_smoke_model",
           "smoke_model_dir"]
