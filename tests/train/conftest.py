"""Fixtures for the training tests: generated images, a micro model, the tiny config, a compile cache.

The *micro* model is the built-in tiny smoke model cut to two UNet/VAE levels and one CLIP layer
(built here from `pasd_jax.fixtures.tiny`'s pieces): its train step compiles ~3× faster on a CPU,
which keeps the end-to-end tests within the suite's time budget.

The persistent compilation cache (a session temp folder, also handed to subprocesses through
JAX_COMPILATION_CACHE_DIR) lets every `train()` call with the same shapes reuse one compiled step.
"""

import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from pasd_jax.assembly import defaults
from pasd_jax.assembly.init import init_params

_FLAGS = ("jax_disable_most_optimizations", "jax_compilation_cache_dir",
          "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(scope="package", autouse=True)
def compilation_cache(tmp_path_factory):
    """Fast-compile flags and a persistent cache for tests/train only (restored afterwards, so the
    rest of a full-suite run keeps its own settings)."""
    old = {name: jax.config.values[name] for name in _FLAGS}
    path = str(tmp_path_factory.mktemp("jax_cache"))
    jax.config.update("jax_disable_most_optimizations", True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield path
    for name, value in old.items():
        jax.config.update(name, value)
    try:  # forget the initialised cache object too (private API; harmless if it moves)
        from jax._src import compilation_cache as _cc

        _cc.reset_cache()
    except Exception:  # noqa: BLE001
        pass


def write_images(folder, count: int, size=(72, 88), seed: int = 0, captions: bool = True) -> str:
    """Smooth random RGB images (and a caption file for every other one) in `folder`."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    for i in range(count):
        freq = rng.uniform(1, 6, size=(3, 2))
        phase = rng.uniform(0, 2 * np.pi, size=3)
        img = np.stack([0.5 + 0.5 * np.sin(2 * np.pi * (f[0] * yy + f[1] * xx) + p)
                        for f, p in zip(freq, phase)], axis=-1)
        Image.fromarray((img * 255).astype(np.uint8)).save(os.path.join(folder, f"img_{i:03d}.png"))
        if captions and i % 2 == 0:
            with open(os.path.join(folder, f"img_{i:03d}.txt"), "w") as f:
                f.write(f"a picture number {i}")
    return str(folder)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"), 6)


def micro_configs(family: str = "pasd") -> dict:
    """Tiny configs with a 2-level UNet (32, 32), 2× VAE, 2-level DR net and a 1-layer CLIP."""
    from pasd_jax.fixtures import tiny
    from pasd_jax.models.controlnet import controlnet_config_from_unet

    c = tiny.tiny_configs(family)
    c["unet"].update(down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                     up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], block_out_channels=[32, 32])
    c["controlnet"] = controlnet_config_from_unet(c["unet"], conditioning_embedding_out_channels=[8, 16])
    c["vae"].update(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                    block_out_channels=[16, 16])
    c["text_encoder"].update(num_hidden_layers=1)
    return c


def write_micro_pipeline(dst: str, family: str = "pasd", seed: int = 0) -> str:
    """A converted pipeline folder (like `make_tiny_pipeline`) of the micro model."""
    from pasd_jax.assembly import weights
    from pasd_jax.fixtures import tiny
    from pasd_jax.models.controlnet import controlnet_params_from_unet

    configs = micro_configs(family)
    params = {n: init_params(cfg, seed + i) for i, (n, cfg) in enumerate(configs.items())}
    params["controlnet"] = controlnet_params_from_unet(params["unet"], params["controlnet"])
    for name, cfg in configs.items():
        weights.save_converted(os.path.join(dst, name), cfg, params[name], component=name)
    tiny.write_tiny_tokenizer(os.path.join(dst, "tokenizer"))
    os.makedirs(os.path.join(dst, "scheduler"))
    with open(os.path.join(dst, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(defaults.SCHEDULER, f)
    return dst


@pytest.fixture(scope="session")
def micro_base(tmp_path_factory):
    return write_micro_pipeline(str(tmp_path_factory.mktemp("micro") / "base"))


def tiny_config(image_folder: str, base: str = "tiny", **overrides):
    """`configs/realisr.py:tiny` on `image_folder` (32 px crops, global batch 8 so a 2×4 mesh divides
    it), on `base` (a converted folder, e.g. the micro model)."""
    from configs import realisr

    config = realisr.get_config("tiny")
    with config.unlocked():
        config.base = base
        config.data.resolution = 32
        config.data.paths = (image_folder,)
        config.data.global_batch = 8
        config.train.log_every = 1
        config.train.validate_every = 0
        for key, value in overrides.items():
            node = config
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return config
