"""StableSR sampling speed: the `_oldcanvas_tile` pipeline (`pasd_jax.sampling.stablesr_pipeline`).

Released-size random weights (the configs of `v2-finetune_text_T_512.yaml` / the CFW yaml: SD2.1
SFT UNet 919M, time-aware encoder 52M, VAE/CFW 128M) or `--tiny` (the smoke model). One LR image
of `--lr`² pixels is restored at `--upscale` with `--steps` respaced DDPM steps; prints the
latent canvas / VQGAN patch geometry, the first call (compile included), the median seconds per
image over `--repeats` further calls, seconds per DDPM step, and peak memory. No torch baseline
(the original code needs its repository); runs on whatever device JAX finds.

    python benchmarks/stablesr_sample.py                          # 128² LR -> 512², 50 steps
    python benchmarks/stablesr_sample.py --lr 256 --steps 200     # 1024² output, 3x3 canvas tiles
    python benchmarks/stablesr_sample.py --tiny --lr 48 --input-size 64 --steps 4
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import jax
import numpy as np

from convert.stablesr_layout import cfw_config, sr_configs
from pasd_jax.assembly.stablesr import COMPONENTS, bundle_from
from pasd_jax.fixtures import stablesr_tiny
from pasd_jax.imaging.torch_resize import reflect_pad_to_32, scaled_size
from pasd_jax.sampling.stablesr_pipeline import SeededNoise, StableSROptions, restore_tile, vqgan_patches
from pasd_jax.sampling.stablesr_sampler import canvas_geometry


def _peak() -> str:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB device"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB host RSS"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the smoke model instead of released-size weights")
    ap.add_argument("--lr", type=int, default=128, help="LR image side (px)")
    ap.add_argument("--upscale", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--input-size", type=int, default=512)
    ap.add_argument("--tile-overlap", type=int, default=32)
    ap.add_argument("--vqgantile-size", type=int, default=1280)
    ap.add_argument("--vqgantile-stride", type=int, default=1000)
    ap.add_argument("--tiles-per-call", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    if args.tiny:
        configs, sampling = stablesr_tiny.CONFIGS, stablesr_tiny.SAMPLING
        context = np.zeros((1, 7, 16), np.float32)
    else:
        configs = sr_configs(None)
        configs["cfw"] = cfw_config(None)
        sampling, context = configs["sampling"], np.zeros((1, 77, 1024), np.float32)
    t0 = time.perf_counter()
    params = {name: stablesr_tiny.random_params(name, i, configs[name]) for i, name in enumerate(COMPONENTS)}
    bundle = bundle_from(configs, params, sampling, context, source="random")
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(bundle.params))
    print(f"device {jax.devices()[0].device_kind}; {n_params / 1e6:.0f}M parameters, "
          f"init {time.perf_counter() - t0:.1f} s")

    options = StableSROptions(ddpm_steps=args.steps, upscale=args.upscale, input_size=args.input_size,
                              tile_overlap=args.tile_overlap, vqgantile_size=args.vqgantile_size,
                              vqgantile_stride=args.vqgantile_stride,
                              tiles_per_call=args.tiles_per_call)
    image = np.random.default_rng(0).uniform(-1, 1, (1, args.lr, args.lr, 3)).astype(np.float32)
    scale = max(options.input_size / args.lr, options.upscale)
    padded = reflect_pad_to_32(np.zeros((1,) + scaled_size(args.lr, args.lr, scale) + (1,), np.float32))[0]
    ph, pw = padded.shape[1:3]
    tiled = max(ph, pw) > options.vqgantile_size
    patches = vqgan_patches(ph, pw, options.vqgantile_size, options.vqgantile_stride) if tiled else [(0, 0, ph, pw)]
    lat = patches[0][2] // 8
    origins, _ = canvas_geometry(lat, patches[0][3] // 8, options.input_size // 8, options.tile_overlap)
    print(f"{args.lr}² LR -> {ph}x{pw} padded, {len(patches)} VQGAN patch(es), {len(origins)} canvas tiles "
          f"per step, {args.steps} steps")

    def run():
        out = restore_tile(bundle, image, options, SeededNoise(42))
        return np.asarray(out["image"])

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    steps = args.steps * len(patches)
    print(f"first call (compile + run) {first:.1f} s; median {med:.2f} s/image over {args.repeats}; "
          f"{med / steps * 1e3:.1f} ms per DDPM step ({len(origins)} tiles); peak {_peak()}")


if __name__ == "__main__":
    main()
