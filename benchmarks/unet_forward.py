"""Compile time and steady forward time of the SD1.5-size UNet: our Flax UNet vs diffusers (torch).

Random weights, latent 64×64, batch 2 (one CFG pair), fp32 unless --dtype bfloat16.
Prints one line per framework (with counted FLOPs, FLOP/s and MFU against the device's peak from
`pasd_jax/perf/peak.py`; FLOP/s only on a CPU) and the ratio. Usage:

    python benchmarks/unet_forward.py [--family stock|pasd|pasd_light] [--repeats 5] [--no-torch] [--peak-tflops X]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax.assembly import registry
from pasd_jax.assembly.init import init_params
from pasd_jax.models import unet as unet_lib
from pasd_jax.perf import model_flops, peak

SD15_UNET = pathlib.Path(__file__).resolve().parents[2] / "shared/reference/sd15/unet/config.json"
DEFAULT_CONFIG = dict(
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, in_channels=4, out_channels=4, norm_num_groups=32)


def _config() -> dict:
    return json.loads(SD15_UNET.read_text()) if SD15_UNET.exists() else DEFAULT_CONFIG


def _timed(fn, repeats: int) -> tuple[float, float]:
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def _rate(flops: int, seconds: float, dtype, override) -> str:
    return f"{flops / 1e9:.1f} GFLOP, " + peak.describe(flops, seconds, peak.peak_tflops(dtype=dtype, override=override))


def bench_flax(config: dict, family: str, batch: int, size: int, repeats: int, dtype, peak_override=None) -> float:
    model = unet_lib.from_config(config, family=family, dtype=dtype)
    sizes, chans = model.skip_sizes(size, size), model.skip_channels()
    rng = np.random.default_rng(0)
    sample = jnp.asarray(rng.standard_normal((batch, size, size, 4)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((batch, 77, model.cross_dims()[0])), jnp.float32)
    residuals = None, None
    if family != "stock":
        residuals = ([jnp.zeros((batch, h, w, c), jnp.float32) for (h, w), c in zip(sizes, chans)],
                     jnp.zeros((batch,) + sizes[-1] + (chans[-1],), jnp.float32))
    cfg = dict(config, **{registry.FAMILY_KEY: family})
    params = jax.device_put(init_params(cfg, seed=0))  # numpy init: no XLA compile of init
    n_params = sum(x.size for x in jax.tree.leaves(params))
    timestep = jnp.full((batch,), 500, jnp.int32)
    forward = jax.jit(lambda p, x, t, c, r: model.apply({"params": p}, x, t, c, *r))
    start = time.perf_counter()
    compiled = forward.lower(params, sample, timestep, context, residuals).compile()
    compile_s = time.perf_counter() - start
    run = lambda: compiled(params, sample, timestep, context, residuals).block_until_ready()
    first, steady = _timed(run, repeats)
    print(f"flax  {family:10s} params={n_params / 1e6:.1f}M  compile={compile_s:.1f}s  first={first:.2f}s  "
          f"steady={steady:.3f}s/forward  ({jax.devices()[0].platform}, {jnp.dtype(dtype).name})")
    print(f"      {_rate(model_flops.unet_flops(model, size, batch), steady, dtype, peak_override)}")
    return steady


def bench_torch(config: dict, batch: int, size: int, repeats: int, dtype=jnp.float32,
                peak_override=None) -> float | None:
    try:
        import torch
        from diffusers import UNet2DConditionModel
    except ImportError:
        print("torch  (not installed: pip install -e '.[test]')")
        return None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = UNet2DConditionModel.from_config(config).eval().to(dev)
    sample = torch.randn(batch, 4, size, size, device=dev)
    context = torch.randn(batch, 77, config["cross_attention_dim"], device=dev)
    timestep = torch.full((batch,), 500, device=dev)

    def run():
        model(sample, timestep, context)
        if dev == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        first, steady = _timed(run, repeats)
    print(f"torch stock      {dev} threads={torch.get_num_threads()}  first={first:.2f}s  steady={steady:.3f}s/forward")
    stock = unet_lib.from_config(config, family="stock")
    print(f"      {_rate(model_flops.unet_flops(stock, size, batch, residuals=False), steady, dtype, peak_override)}")
    return steady


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="stock", choices=["stock", "pasd", "pasd_light"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--no-torch", action="store_true")
    peak.add_argument(parser)
    args = parser.parse_args()
    config = _config()
    ours = bench_flax(config, args.family, args.batch, args.latent, args.repeats, jnp.dtype(args.dtype),
                      args.peak_tflops)
    if not args.no_torch:
        theirs = bench_torch(config, args.batch, args.latent, args.repeats, peak_override=args.peak_tflops)
        if theirs:
            print(f"ratio flax/torch = {ours / theirs:.2f}" + ("" if args.family == "stock" else
                  "  (torch runs the stock UNet; pasd families do more work)"))


if __name__ == "__main__":
    main()
