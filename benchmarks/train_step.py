"""Training-step throughput: step time, images/s and MFU per batch size, the largest batch that fits,
and (`--devices N` on forced CPU devices) the same sharded step on 1…N devices.

Runs the real `pasd_jax.train.step.train_step` (frozen VAE + CLIP + UNet trunk, trainable
ControlNet + PACA, AdamW) under `jax.jit` with the training mesh and shardings, on random weights
and random data already on the devices (no input pipeline). Default: the SD1.5-size PASD model at
512², batches 4, 16, 32 per device and the largest that fits (doubling, then bisection, until
XLA reports out of memory). `--tiny` uses the built-in smoke model at 64² so it also runs on a CPU.

    python benchmarks/train_step.py --dtype bfloat16 --frozen-bf16 --remat dots     # a GPU
    python benchmarks/train_step.py --tiny --batches 2,4 --no-largest --steps 2      # CPU smoke
    python benchmarks/train_step.py --tiny --devices 8 --batches 2 --steps 1         # 1, 2, 4, 8 CPU devices

MFU = model FLOPs of one step (`pasd_jax.perf.flops.count_flops` on the step's jaxpr: forward,
backward and optimizer, remat recomputation not counted) / (step time · peak of the device kind
from `pasd_jax.perf.peak` · devices); `--peak-tflops` overrides the peak (none on CPU). With
`--devices N` the same global batch runs on 1, 2, 4, …, N forced CPU devices (a data mesh) and the
losses and updated parameters are compared: the sharded step is the same function on every mesh.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import sys
import time


def _early_devices(argv) -> int:
    """`--devices N` must set the forced CPU device count before jax is imported."""
    for i, a in enumerate(argv):
        if a.startswith("--devices="):
            return int(a.split("=", 1)[1])
        if a == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
    return 0


if _early_devices(sys.argv[1:]):
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_early_devices(sys.argv[1:])}")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pasd_jax.assembly import defaults, registry  # noqa: E402
from pasd_jax.assembly.bundle import COMPONENTS, PASDBundle  # noqa: E402
from pasd_jax.assembly.init import init_params  # noqa: E402
from pasd_jax.diffusion.schedule import NoiseSchedule  # noqa: E402
from pasd_jax.fixtures import tiny  # noqa: E402
from pasd_jax.models.controlnet import controlnet_config_from_unet  # noqa: E402
from pasd_jax.train import sharding  # noqa: E402
from pasd_jax.train.optim import make_optimizer  # noqa: E402
from pasd_jax.train.state import TrainState, split  # noqa: E402
from pasd_jax.train.step import StepOptions, train_step  # noqa: E402
from pasd_jax.perf import peak as perf_peak  # noqa: E402
from pasd_jax.perf.flops import count_flops  # noqa: E402

SD15_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared/reference/sd15"
SD15_UNET = dict(
    _class_name="UNet2DConditionModel", block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    attention_head_dim=8, cross_attention_dim=768, in_channels=4, out_channels=4, norm_num_groups=32,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
SD15_VAE = dict(
    _class_name="AutoencoderKL", block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32)
CLIP_L = dict(
    architectures=["CLIPTextModel"], model_type="clip_text_model", vocab_size=49408, hidden_size=768,
    intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
    layer_norm_eps=1e-5, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2)


def _json(path: pathlib.Path, fallback: dict) -> dict:
    return json.loads(path.read_text()) if path.is_file() else dict(fallback)


def model_configs(tiny_model: bool, family: str) -> dict:
    """{"unet", "controlnet", "vae", "text_encoder"} configs (SD1.5 from ../shared when present)."""
    if tiny_model:
        return tiny.tiny_configs(family)
    unet = _json(SD15_DIR / "unet/config.json", SD15_UNET)
    unet[registry.FAMILY_KEY] = family
    return {"unet": unet, "controlnet": controlnet_config_from_unet(unet),
            "vae": _json(SD15_DIR / "vae/config.json", SD15_VAE),
            "text_encoder": _json(SD15_DIR / "text_encoder/config.json", CLIP_L)}


TRAINABLE = ("^controlnet/", "pixel_attentions", "norm2_plus", "attn2_plus", "proj_in_plus")
OPTIM = dict(lr=5e-5, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, clip_norm=1.0, grad_accum=1)


class Bench:
    """Models, host weights and optimiser of one benchmark configuration (see module doc)."""

    def __init__(self, args):
        self.args = args
        self.res = args.resolution or (64 if args.tiny else 512)
        compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
        self.configs = model_configs(args.tiny, args.family)
        build = lambda name, **kw: registry.build_module(self.configs[name], **kw)  # noqa: E731
        self.models = PASDBundle(
            unet=build("unet", dtype=compute).clone(remat_policy=args.remat),
            controlnet=build("controlnet", dtype=compute).clone(remat_policy=args.remat),
            vae=build("vae"), text_encoder=build("text_encoder", dtype=compute),
            schedule=NoiseSchedule.from_config(defaults.SCHEDULER), family=args.family, source="random")
        # Seeded random weights made on the host with numpy (a jitted per-leaf init compiles for
        # minutes on a CPU), placed per mesh in `place`.
        host = {name: init_params(self.configs[name], i) for i, name in enumerate(COMPONENTS)}
        self.trainable, frozen = split(host, TRAINABLE)
        if args.frozen_bf16:
            frozen = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), frozen)
        self.frozen = frozen
        self.n_train = sum(x.size for x in jax.tree.leaves(self.trainable))
        self.n_frozen = sum(x.size for x in jax.tree.leaves(self.frozen))
        self.tx, self.lr_fn = make_optimizer(type("Optim", (), OPTIM))

    def place(self, devices):
        """(state, frozen, jitted step, mesh) on `devices` (data × fsdp mesh)."""
        mesh = sharding.make_mesh(-1, self.args.fsdp, devices=devices)
        create = functools.partial(TrainState.create, tx=self.tx, seed=0)
        state_sh = sharding.tree_shardings(jax.eval_shape(create, self.trainable), mesh)
        frozen_sh = sharding.tree_shardings(self.frozen, mesh)
        trainable = sharding.put(self.trainable, state_sh.params)
        state = jax.jit(create, out_shardings=state_sh)(trainable)
        frozen = sharding.put(self.frozen, frozen_sh)
        fn = functools.partial(train_step, models=self.models, tx=self.tx, lr_fn=self.lr_fn,
                               opts=StepOptions(latent_scale=0.18215))
        step = jax.jit(fn, in_shardings=(state_sh, frozen_sh, sharding.batch_sharding(mesh)),
                       out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
        return state, frozen, step, fn, mesh

    def batch(self, n: int, mesh, seed: int = 0) -> dict:
        rng = np.random.default_rng(seed)
        data = {"hq": rng.uniform(-1, 1, (n, self.res, self.res, 3)).astype(np.float32),
                "lq": rng.uniform(0, 1, (n, self.res, self.res, 3)).astype(np.float32),
                "prompt_ids": rng.integers(0, self.configs["text_encoder"]["vocab_size"], (n, 77)).astype(np.int32)}
        return sharding.global_batch(data, mesh)


def _oom(err: Exception) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _fits(compiled) -> bool:
    """Whether XLA's memory analysis of the compiled step fits the device (True when unknown)."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
        limit = stats.get("bytes_limit")
        mem = compiled.memory_analysis()
        need = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        return not limit or need <= limit
    except Exception:  # noqa: BLE001 - no analysis on this backend
        return True


def measure(bench: Bench, placed, per_device: int, steps: int, peak) -> dict | None:
    """Figures of one batch size per device; None when it does not fit."""
    state, frozen, step, fn, mesh = placed
    n = per_device * mesh.devices.size
    try:
        batch = bench.batch(n, mesh)
        t0 = time.perf_counter()
        compiled = step.lower(state, frozen, batch).compile()
        compile_s = time.perf_counter() - t0
        if not _fits(compiled):
            return None
        flops = count_flops(fn, state, frozen, batch)
        state, metrics = compiled(jax.tree.map(jnp.copy, state), frozen, batch)  # warm-up
        jax.block_until_ready(metrics["loss"])
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, frozen, batch)
            jax.block_until_ready(metrics["loss"])
            times.append(time.perf_counter() - t0)
    except Exception as err:  # noqa: BLE001
        if _oom(err):
            return None
        raise
    step_s = statistics.median(times)
    util = perf_peak.mfu(flops, step_s, peak, mesh.devices.size)
    return dict(batch=n, per_device=per_device, step_s=step_s, images_s=n / step_s, flops=flops, compile_s=compile_s,
                mfu=util, loss=float(metrics["loss"]))


def _row(r: dict) -> str:
    mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
    return (f"batch {r['per_device']:3d}/device ({r['batch']:4d}): step {r['step_s'] * 1e3:9.1f} ms, "
            f"{r['images_s']:8.2f} images/s, {r['flops'] / 1e9:10.2f} GFLOP/step, MFU {mfu} "
            f"(compile {r['compile_s']:.0f} s)")


def largest(bench: Bench, placed, start: int, steps: int, peak, cap: int) -> dict | None:
    """The largest batch per device that fits: doubling from `start`, then bisection."""
    good, bad, best = 0, None, None
    b = start
    while b <= cap:
        r = measure(bench, placed, b, 1, peak)
        print(f"  probe {b}/device: {'fits' if r else 'out of memory'}", flush=True)
        if r is None:
            bad = b
            break
        good, best, b = b, r, b * 2
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        r = measure(bench, placed, mid, 1, peak)
        print(f"  probe {mid}/device: {'fits' if r else 'out of memory'}", flush=True)
        good, bad, best = (mid, bad, r) if r else (good, mid, best)
    return measure(bench, placed, good, steps, peak) if good else None


def scaling(bench: Bench, n_max: int, per_device: int) -> None:
    """The same global batch and initial state on 1, 2, 4, …, n_max devices: same loss and update."""
    total = per_device * n_max
    ref, ns = None, [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= n_max]
    for n in ns:
        state, frozen, step, _, mesh = bench.place(jax.devices()[:n])
        t0 = time.perf_counter()
        new, metrics = step(state, frozen, bench.batch(total, mesh))
        loss = float(metrics["loss"])
        leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(new.params))]
        took = time.perf_counter() - t0
        if ref is None:
            ref = (loss, leaves)
        dparam = max(float(np.max(np.abs(a - b))) for a, b in zip(leaves, ref[1]))
        print(f"{n:3d} devices (mesh {dict(mesh.shape)}): global batch {total}, loss {loss:.6f} "
              f"(Δ vs 1 device {abs(loss - ref[0]):.2e}), max |Δparam| {dparam:.2e}, first step {took:.1f} s",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="built-in smoke model at 64² (CPU-sized)")
    ap.add_argument("--family", default="pasd", choices=["pasd", "pasd_light"])
    ap.add_argument("--resolution", type=int, default=None, help="HQ crop side (default 512, 64 with --tiny)")
    ap.add_argument("--batches", default="4,16,32", help="batch sizes per device to time (comma-separated)")
    ap.add_argument("--no-largest", action="store_true", help="skip the search for the largest batch that fits")
    ap.add_argument("--max-batch", type=int, default=512, help="cap of the largest-batch search (per device)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    ap.add_argument("--frozen-bf16", action="store_true", help="store the frozen weights in bf16 on the device")
    ap.add_argument("--remat", default="none", choices=["none", "full", "dots", "attention"])
    ap.add_argument("--fsdp", type=int, default=1, help="fsdp axis size of the mesh (rest is data)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--devices", type=int, default=0, help="scaling check on 1…N forced CPU devices")
    perf_peak.add_argument(ap)
    args = ap.parse_args()
    t0 = time.perf_counter()
    bench = Bench(args)
    dev = jax.devices()[0]
    print(f"device: {jax.device_count()} × {dev.device_kind} ({jax.default_backend()})")
    print(f"model: {'tiny' if args.tiny else 'SD1.5-size'} {args.family}, {bench.res}², compute {args.dtype}, "
          f"frozen weights {'bf16' if args.frozen_bf16 else 'fp32'}, remat {args.remat}; params: trainable "
          f"{bench.n_train / 1e6:.1f} M (fp32 + AdamW), frozen {bench.n_frozen / 1e6:.1f} M; "
          f"init {time.perf_counter() - t0:.1f} s", flush=True)
    sizes = [int(b) for b in args.batches.split(",") if b]
    if args.devices:
        scaling(bench, args.devices, sizes[0])
        return
    peak = perf_peak.peak_tflops(dev.device_kind, jnp.dtype(args.dtype), args.peak_tflops)
    placed = bench.place(jax.devices())
    results = {}
    for b in sizes:
        r = measure(bench, placed, b, args.steps, peak)
        results[b] = r
        print(_row(r) if r else f"batch {b:3d}/device: does not fit", flush=True)
    if not args.no_largest:
        start = max([b for b, r in results.items() if r] or [1])
        r = largest(bench, placed, start, args.steps, peak, args.max_batch)
        print(("largest that fits: " + _row(r)) if r else "largest that fits: none", flush=True)
    if peak is None:
        print("MFU: no peak for this device kind (pass --peak-tflops)")


if __name__ == "__main__":
    main()
