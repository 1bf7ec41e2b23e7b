"""`sample.py --demo`: the whole pipeline on a generated image with the tiny built-in smoke model.

Nothing is downloaded and no file of the user's is needed: the smoke model
(`pasd_jax.fixtures.tiny`, random weights) is written to a cache folder once, and the input is a
procedurally drawn scene, degraded (box-downscaled, blurred, noised, JPEG-compressed) like a
real-world low-quality photo. The output shows that every stage runs, not a restoration.
"""

from __future__ import annotations

import io
import os
import pathlib

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pasd_jax.assembly import home
from pasd_jax.fixtures import tiny

#: Processing size (shorter side, px) of smoke models unless --process-size is given: the demo
#: image's side. The SD default (768) makes even the tiny model take minutes per image on a CPU.
SMOKE_PROCESS_SIZE = 192
DEMO_OUTPUT = "demo_out"  # --demo's --output when none is given (in .gitignore)
SMOKE_BANNER = ("SMOKE MODEL: tiny built-in PASD with random weights — this checks that the pipeline runs; "
                "the output is NOT a restoration. Use --ckpt/--base with converted PASD weights for real results.")


def demo_model_dir() -> pathlib.Path:
    """Folder of the smoke model under the models home (created on first use, atomically)."""
    folder = home.models_home() / "demo" / "tiny_pasd"
    if not folder.is_dir():
        tiny.make_tiny_pipeline(folder, family="pasd", seed=0)
    return folder


def demo_image(size: int = SMOKE_PROCESS_SIZE, seed: int = 0) -> np.ndarray:
    """A degraded synthetic scene: uint8 [size, size, 3] (sky gradient, sun, hills, house, text)."""
    rng = np.random.default_rng(seed)
    big = 4 * size
    y = np.linspace(0.0, 1.0, big)[:, None, None]
    sky = (np.array([70, 130, 220]) * (1 - y) + np.array([200, 225, 250]) * y).astype(np.uint8)
    img = Image.fromarray(np.broadcast_to(sky, (big, big, 3)).copy())
    draw = ImageDraw.Draw(img)
    s = big / 100
    draw.ellipse([70 * s, 8 * s, 88 * s, 26 * s], fill=(255, 210, 60))
    draw.polygon([(0, 70 * s), (30 * s, 48 * s), (60 * s, 66 * s), (100 * s, 45 * s), (100 * s, 100 * s),
                  (0, 100 * s)], fill=(60, 140, 70))
    draw.rectangle([20 * s, 58 * s, 44 * s, 80 * s], fill=(180, 70, 50))
    draw.polygon([(17 * s, 58 * s), (32 * s, 46 * s), (47 * s, 58 * s)], fill=(90, 50, 40))
    draw.rectangle([29 * s, 68 * s, 35 * s, 80 * s], fill=(60, 40, 30))
    for i in range(8):  # fine stripes: detail a restorer would have to recover
        draw.line([(55 * s, (82 + 2 * i) * s), (95 * s, (82 + 2 * i) * s)], fill=(240, 240, 240), width=int(s / 2))
    draw.text((4 * s, 4 * s), "pasd-jax", fill=(20, 20, 20))
    img = img.resize((size, size), Image.BOX).filter(ImageFilter.GaussianBlur(1.2))
    arr = np.asarray(img, np.float32) + rng.normal(0.0, 6.0, (size, size, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=40)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def write_demo_input(folder: str | os.PathLike) -> pathlib.Path:
    """Write the demo input as `folder/demo_input.png` (overwriting a previous demo input)."""
    from pasd_jax.imaging.io import write_image

    path = pathlib.Path(folder) / "demo_input.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_image(path, demo_image(), overwrite=True)
