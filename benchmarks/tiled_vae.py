"""Time and peak memory of the tiled VAE on a large image: tiny 8× VAE on the CPU by default.

Encode of a [1, S, S, 3] image and decode of a [1, S/8, S/8, 4] latent (S = 4096 by default), each
in its own child process so that `ru_maxrss` is that task's peak resident memory (and, on a GPU, the
device's peak bytes in use). Prints the tile layout, XLA's temp-buffer estimate, compile time, run
time, peak memory and counted FLOPs with FLOP/s and MFU (`pasd_jax.perf`) per task. A watchdog
kills a child when the machine's available memory falls below `--min-free-gb` (shared machines).
`--vae sd15` uses SD1.5's VAE shape with random weights (meant for a GPU). Usage:

    python benchmarks/tiled_vae.py [--size 4096] [--only encode|decode] [--repeats 1] [--vae tiny|sd15]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time


SD15_VAE = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
    "act_fn": "silu", "sample_size": 512, "scaling_factor": 0.18215,
}


def _mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def _child(task: str, size: int, repeats: int, chunk: int, vae: str, peak_tflops=None) -> None:
    """Runs one task in this process and prints its figures."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pasd_jax.assembly import registry
    from pasd_jax.assembly.init import init_params
    from pasd_jax.fixtures import tiny
    from pasd_jax.perf import flops, peak
    from pasd_jax.sampling import tiled_vae as tv

    config = tiny.tiny_vae_config() if vae == "tiny" else SD15_VAE
    module, params = registry.build_module(config), init_params(config, seed=0)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    f = module.downscale
    rng = np.random.default_rng(0)
    if task == "encode":
        arg = jnp.asarray(rng.uniform(-1, 1, (1, size, size, 3)), jnp.float32)
        fn = jax.jit(lambda p, x: tv.tiled_encode(module, p, x, attention_query_chunk=chunk))
        tiles = tv.tile_layout(size, size, tv.ENCODER_TILE, tv.ENCODER_PAD, f)
        needed = tv.needs_tiled_encode(size, size)
    else:
        arg = jnp.asarray(rng.standard_normal((1, size // f, size // f, 4)), jnp.float32)
        fn = jax.jit(lambda p, z: tv.tiled_decode(module, p, z, attention_query_chunk=chunk))
        tiles = tv.tile_layout(size // f, size // f, tv.DECODER_TILE, tv.DECODER_PAD)
        needed = tv.needs_tiled_decode(size // f, size // f)
    (py0, py1, px0, px1) = tiles[0].padded
    print(f"{task}: {len(tiles)} tiles of {py1 - py0}x{px1 - px0} (input px), tiling needed: {needed}", flush=True)
    start = time.perf_counter()
    compiled = fn.lower(params, arg).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    if analysis is not None:
        print(f"{task}: XLA temp buffers {analysis.temp_size_in_bytes / 2**30:.2f} GiB", flush=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(params, arg))
        times.append(time.perf_counter() - start)
    out = out[0] if isinstance(out, tuple) else out
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    on_device = f", device peak {stats['peak_bytes_in_use'] / 2**30:.2f} GiB" if stats else ""
    print(f"{task} {size}x{size} ({vae} VAE, {device.platform}): out {tuple(out.shape)}, "
          f"finite {bool(jnp.isfinite(out).all())}, compile {compile_s:.1f} s, run {min(times):.2f} s "
          f"(min of {repeats}), peak RSS {peak_gb:.2f} GiB{on_device}", flush=True)
    counted = flops.count_flops(fn, params, arg)
    top = peak.peak_tflops(dtype=jnp.float32, override=peak_tflops)
    print(f"{task}: counted {counted / 1e12:.3f} TFLOP, {peak.describe(counted, min(times), top)}", flush=True)


def _run_child(task: str, args) -> int:
    cmd = [sys.executable, __file__, "--child", task, "--size", str(args.size), "--repeats", str(args.repeats),
           "--chunk", str(args.chunk), "--vae", args.vae]
    if args.peak_tflops:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    proc = subprocess.Popen(cmd)
    while proc.poll() is None:
        if _mem_available_gb() < args.min_free_gb:
            proc.kill()
            proc.wait()
            print(f"{task}: killed, machine's available memory fell below {args.min_free_gb} GiB", flush=True)
            return 1
        time.sleep(0.2)
    return proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="image side in pixels (multiple of 8)")
    parser.add_argument("--only", choices=("encode", "decode"), default=None)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=1024, help="attention_query_chunk")
    parser.add_argument("--min-free-gb", type=float, default=2.0)
    parser.add_argument("--vae", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s of one chip (default: table)")
    parser.add_argument("--child", choices=("encode", "decode"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.size, args.repeats, args.chunk, args.vae, args.peak_tflops)
        return
    rc = 0
    for task in ([args.only] if args.only else ["encode", "decode"]):
        rc |= _run_child(task, args)
    sys.exit(rc)


if __name__ == "__main__":
    main()
