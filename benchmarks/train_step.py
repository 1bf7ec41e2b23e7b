"""Training-step throughput: step time, images/s and model-FLOPs utilisation (MFU).

Runs the real `pasd_jax.train.step.train_step` (frozen VAE + CLIP + UNet trunk, trainable
ControlNet + PACA, AdamW) under `jax.jit` with the training mesh and shardings, on random weights
and random data already on the devices (no input pipeline), and prints figures. Default: the
SD1.5-size PASD model at 512², batch 4 per device. `--tiny` uses the built-in smoke model at 64²
so it also runs on a CPU.

    python benchmarks/train_step.py                       # SD1.5 size, 512², fp32
    python benchmarks/train_step.py --dtype bfloat16 --remat dots
    python benchmarks/train_step.py --tiny --steps 3      # CPU smoke

FLOPs come from XLA's cost analysis of the compiled step (forward + backward + optimizer, remat
recomputation included), so "MFU" here is hardware-FLOPs utilisation when remat is on. The peak
is looked up from the device kind (dense bf16 tensor-core / MXU figures; fp32 runs are still
compared against that peak); pass `--peak-tflops` to override, e.g. on a CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax.assembly import defaults, registry
from pasd_jax.assembly.bundle import COMPONENTS, PASDBundle
from pasd_jax.assembly.init import init_params
from pasd_jax.diffusion.schedule import NoiseSchedule
from pasd_jax.fixtures import tiny
from pasd_jax.models.controlnet import controlnet_config_from_unet
from pasd_jax.perf import model_flops, peak
from pasd_jax.train import sharding
from pasd_jax.train.optim import make_optimizer
from pasd_jax.train.state import TrainState, split
from pasd_jax.train.step import StepOptions, train_step

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

# Dense bf16 peak per chip, TFLOP/s (vendor figures, no sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
               "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6 lite": 918.0, "TPU v6e": 918.0}


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


def peak_flops(override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return tflops * 1e12
    return None


def model_flops_mfu(flops: float, seconds: float, override, dtype, n_devices: int) -> str:
    return peak.describe(flops, seconds, peak.peak_tflops(dtype=dtype, override=override), n_devices)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="built-in smoke model at 64² (CPU-sized)")
    ap.add_argument("--family", default="pasd", choices=["pasd", "pasd_light"])
    ap.add_argument("--resolution", type=int, default=None, help="HQ crop side (default 512, 64 with --tiny)")
    ap.add_argument("--batch-per-device", type=int, default=None, help="default 4 (2 with --tiny)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--remat", default="none", choices=["none", "full", "dots"])
    ap.add_argument("--fsdp", type=int, default=1, help="fsdp axis size of the mesh (rest is data)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=None)
    args = ap.parse_args()
    res = args.resolution or (64 if args.tiny else 512)
    per_device = args.batch_per_device or (2 if args.tiny else 4)
    compute = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]

    configs = model_configs(args.tiny, args.family)
    models = PASDBundle(unet=registry.build_module(configs["unet"], dtype=compute),
                        controlnet=registry.build_module(configs["controlnet"], dtype=compute),
                        vae=registry.build_module(configs["vae"]),
                        text_encoder=registry.build_module(configs["text_encoder"], dtype=compute),
                        schedule=NoiseSchedule.from_config(defaults.SCHEDULER), family=args.family, source="random")
    mesh = sharding.make_mesh(-1, args.fsdp)
    batch = per_device * jax.device_count()

    # Seeded random weights made on the host with numpy (a jitted per-leaf init compiles for minutes
    # on a CPU), then placed in their shardings.
    t0 = time.perf_counter()
    host = {name: init_params(configs[name], i) for i, name in enumerate(COMPONENTS)}
    inits = sharding.put(host, sharding.tree_shardings(host, mesh))
    del host
    trainable, frozen = split(inits, ("^controlnet/", "pixel_attentions", "norm2_plus", "attn2_plus", "proj_in_plus"))
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
    cfg = type("Optim", (), dict(lr=5e-5, warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2,
                                  clip_norm=1.0, grad_accum=1))
    tx, lr_fn = make_optimizer(cfg)
    create = functools.partial(TrainState.create, tx=tx, seed=0)
    state_sh = sharding.tree_shardings(jax.eval_shape(create, trainable), mesh)
    state = jax.jit(create, out_shardings=state_sh)(trainable)
    frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
    init_s = time.perf_counter() - t0

    rng = np.random.default_rng(0)
    data = {"hq": rng.uniform(-1, 1, (batch, res, res, 3)).astype(np.float32),
            "lq": rng.uniform(0, 1, (batch, res, res, 3)).astype(np.float32),
            "prompt_ids": rng.integers(0, configs["text_encoder"]["vocab_size"], (batch, 77)).astype(np.int32)}
    data = sharding.global_batch(data, mesh)
    opts = StepOptions(latent_scale=0.18215, remat_policy=args.remat)
    step = jax.jit(functools.partial(train_step, models=models, tx=tx, lr_fn=lr_fn, opts=opts),
                   in_shardings=(state_sh, frozen_sh, sharding.batch_sharding(mesh)),
                   out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, data).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0

    state, metrics = compiled(state, frozen, data)  # warm-up
    jax.block_until_ready(metrics["loss"])
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, data)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    peak = peak_flops(args.peak_tflops)
    # cost_analysis describes one device's program under SPMD; scale to the whole mesh.
    total_flops = flops * jax.device_count()
    mfu = f"{100 * total_flops / step_s / (peak * jax.device_count()):.1f} %" if (peak and flops) else "n/a"
    print(f"device: {jax.device_count()} × {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"mesh {dict(mesh.shape)}")
    print(f"model: {'tiny' if args.tiny else 'SD1.5-size'} {args.family}, {res}², batch {batch} "
          f"({per_device}/device), compute {args.dtype}, remat {args.remat}")
    print(f"params: trainable {n_train / 1e6:.1f} M, frozen {n_frozen / 1e6:.1f} M; init {init_s:.1f} s, "
          f"compile {compile_s:.1f} s")
    print(f"step time: {step_s * 1e3:.1f} ms (median of {args.steps}; min {min(times) * 1e3:.1f} ms)")
    print(f"images/s: {batch / step_s:.2f}")
    print(f"FLOPs/step (XLA): {total_flops / 1e9:.2f} GFLOP; achieved {total_flops / step_s / 1e12:.3f} TFLOP/s; "
          f"MFU: {mfu}" + ("" if peak else " (unknown peak for this device; pass --peak-tflops)"))
    # Model FLOPs counted from the jaxpr (pasd_jax.perf; remat recomputation not included).
    counted = model_flops.train_step_flops(models, res, batch)
    counted_mfu = model_flops_mfu(counted, step_s, args.peak_tflops, compute, jax.device_count())
    print(f"FLOPs/step (counted): {counted / 1e9:.2f} GFLOP; {counted_mfu}")
    print(f"loss after {args.steps + 1} steps: {float(metrics['loss']):.4f}")


if __name__ == "__main__":
    main()
