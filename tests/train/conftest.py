"""Fixtures for the training tests: generated images, the tiny config, a shared compilation cache.

The persistent compilation cache (a session temp folder, also handed to subprocesses through
JAX_COMPILATION_CACHE_DIR) lets every `train()` call with the same shapes reuse one compiled step.
"""

import os

import jax
import numpy as np
import pytest
from PIL import Image

jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("jax_cache"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


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


def tiny_config(image_folder: str, **overrides):
    """`configs/realisr.py:tiny` on `image_folder`, global batch 8 (divisible by a 2×4 mesh)."""
    from configs import realisr

    config = realisr.get_config("tiny")
    with config.unlocked():
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
