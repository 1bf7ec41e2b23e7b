"""Sampling speed: our compiled PASD sampler vs diffusers' StableDiffusionControlNetPipeline.

SD1.5-size random weights, `--steps` DDIM steps with CFG, VAE encode (ANS init) and decode
included. For every `--sizes` × `--batches` pair: compile time (first call), median seconds per
call over `--repeats` further calls, s/image, images/s, counted-FLOP MFU and peak device memory
(cumulative over the run); the best batch (most images/s) of each size is named. Every size runs
as sample.py runs it: latent tiles above `--tile-size`² latent px, the tiled VAE above its
thresholds (both on at 2048² with the defaults; "tiled" in the output). Then diffusers (stock ControlNet + stock
UNet: PASD's PACA and DR net are extra work on our side) at batch 1 and the best batch of the
first size, when torch and diffusers are importable, and the ratios. The last line is JSON.

    python benchmarks/sample.py                              # SD1.5 size, 512², batches 1 and 4
    python benchmarks/sample.py --batches 1,8,16 --sizes 512,1024,2048
    python benchmarks/sample.py --tiny --sizes 128 --batches 1,2   # smoke run on a CPU
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax.assembly import defaults, registry
from pasd_jax.assembly.bundle import PASDBundle
from pasd_jax.assembly.init import init_params
from pasd_jax.diffusion.schedule import NoiseSchedule
from pasd_jax.fixtures import diffusers_kwargs, sd15, tiny
from pasd_jax.perf import model_flops, peak
from pasd_jax.imaging import tiling
from pasd_jax.sampling import defaults as sampling_defaults
from pasd_jax.sampling import tiled_vae
from pasd_jax.sampling.sampler import Noises, Sampler, SamplerSettings, latent_shape, make_inputs


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _jax_peak_gb() -> str:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB device"
    return f"{_peak_rss_gb():.2f} GiB host RSS"


def build_models(args) -> PASDBundle:
    cfgs = tiny.tiny_configs("pasd") if args.tiny else sd15.configs(args.family)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    params, modules = {}, {}
    for i, (name, cfg) in enumerate(cfgs.items()):
        params[name] = jax.device_put(init_params(cfg, seed=i))
        modules[name] = registry.build_module(cfg, **({"dtype": dtype} if name in ("unet", "controlnet") else {}))
    schedule = NoiseSchedule.from_config(defaults.SCHEDULER)
    return PASDBundle(params=params, tokenizer=None, schedule=schedule, family=args.family, source="random",
                      **modules)


def bench_jax(args, models: PASDBundle, size: int, batch: int) -> dict:
    """One (size, batch) point of our sampler; returns its figures."""
    settings = SamplerSettings(num_steps=args.steps, tile_size=args.tile_size)
    lat = size // models.latent_downscale
    tiled = (tiling.needs_tiling(lat, lat, args.tile_size)
             or tiled_vae.needs_tiled_decode(lat, lat, settings.vae_decoder_tile, settings.vae_decoder_pad))
    sampler = Sampler(models, settings)
    rng = np.random.default_rng(0)
    lq = rng.random((batch, size, size, 3), dtype=np.float32)
    text = rng.standard_normal((2 * batch, 77, models.text_encoder.hidden_size)).astype(np.float32)
    one = latent_shape(models, (1, size, size, 3))

    def inputs_for(seed: int):
        noises = Noises.stack([Noises.draw(jax.random.key(seed * 1000 + i), one) for i in range(batch)])
        return sampler.place(make_inputs(lq, text, noises, guidance_scale=9.0), models.params)

    start = time.perf_counter()
    compiled = sampler._sample.lower(*reversed(inputs_for(0))).compile()  # the program __call__ runs
    compile_s = time.perf_counter() - start
    ma = compiled.memory_analysis()
    footprint = (ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes) / 2**30

    def run(seed):  # incl. device -> host of the images
        inputs, params = inputs_for(seed)
        return np.asarray(compiled(params, inputs)["image"])

    run(0)  # first run: allocations, autotuning
    times = []
    for i in range(args.repeats):
        start = time.perf_counter()
        run(i + 1)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    flops = model_flops.sampler_flops(sampler, size, batch)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    peak_tflops = peak.peak_tflops(dtype=dtype, override=args.peak_tflops)
    devices = len(jax.local_devices()) if batch > 1 else 1
    print(f"pasd-jax  {size}² batch {batch}{' (tiled)' if tiled else ''} ({jax.devices()[0].device_kind} x"
          f"{len(jax.local_devices())}, {args.dtype}): compile {compile_s:.1f} s, {median:.3f} s/call, "
          f"{median / batch:.3f} s/image, {batch / median:.2f} images/s (median of {args.repeats}); "
          f"program {footprint:.2f} GiB (weights {ma.argument_size_in_bytes / 2**30:.2f} + temp "
          f"{ma.temp_size_in_bytes / 2**30:.2f}), peak so far {_jax_peak_gb()}")
    print(f"pasd-jax  counted {flops / batch / 1e12:.2f} TFLOP/image: {peak.describe(flops, median, peak_tflops, devices)}")
    return {"size": size, "batch": batch, "tiled": tiled, "compile_s": round(compile_s, 2),
            "s_per_image": median / batch, "images_per_s": batch / median, "tflop_per_image": flops / batch / 1e12,
            "mfu": peak.mfu(flops, median, peak_tflops, devices)}


def bench_torch(args, size: int, batch: int = 1) -> float | None:
    """diffusers' ControlNet pipeline at `size`², `batch` images per call; seconds per image."""
    try:
        import diffusers
        import torch
    except ImportError:
        print("diffusers/torch not importable: skipping the PyTorch comparison")
        return None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    cfgs = tiny.tiny_configs("stock") if args.tiny else sd15.configs("stock")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**diffusers_kwargs(cfgs["unet"]))
    controlnet = diffusers.ControlNetModel.from_unet(unet)
    if args.tiny:
        controlnet = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 24, 32))
    vae = diffusers.AutoencoderKL(**diffusers_kwargs(cfgs["vae"]))
    import transformers
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**{
        k: v for k, v in cfgs["text_encoder"].items() if k not in ("architectures", "model_type")}))
    scheduler = diffusers.DDIMScheduler(**diffusers_kwargs(defaults.SCHEDULER))
    pipe = diffusers.StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet, controlnet=controlnet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).to(dev, dtype)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand((batch, 3, size, size), generator=gen).to(dev, dtype)
    dim = cfgs["text_encoder"]["hidden_size"]
    emb = torch.randn((batch, 77, dim), generator=gen).to(dev, dtype)
    neg = torch.randn((batch, 77, dim), generator=gen).to(dev, dtype)

    def run():
        with torch.no_grad():
            pipe(prompt_embeds=emb, negative_prompt_embeds=neg, image=image, num_inference_steps=args.steps,
                 guidance_scale=9.0, height=size, width=size, output_type="np")
        if dev == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    median = statistics.median(times) / batch
    peak = (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB device" if dev == "cuda"
            else f"{_peak_rss_gb():.2f} GiB host RSS (both runs)")
    print(f"diffusers {diffusers.__version__} {size}² batch {batch} ({dev}, {args.dtype}, stock ControlNet pipeline, "
          f"txt2img from noise): first call {first:.1f} s, {median:.3f} s/image, {1 / median:.2f} images/s "
          f"(median of {args.repeats}), peak {peak}")
    return median


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=_ints, default=[512], help="image sides, comma-separated (default 512)")
    ap.add_argument("--size", type=int, help="one image side (same as --sizes N)")
    ap.add_argument("--batches", type=_ints, default=[1, 4], help="images per call, comma-separated (default 1,4)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tile-size", type=int, default=sampling_defaults.TILE_SIZE,
                    help="latent tile side; larger latents are tiled (default: sample.py's, %(default)s)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--family", choices=("pasd", "pasd_light"), default="pasd")
    ap.add_argument("--tiny", action="store_true", help="tiny smoke model instead of SD1.5 size")
    ap.add_argument("--no-torch", action="store_true")
    peak.add_argument(ap)
    args = ap.parse_args()
    sizes = [args.size] if args.size else args.sizes
    print(f"PASD sampling benchmark: {'tiny' if args.tiny else 'SD1.5-size'} random weights, sizes {sizes}, "
          f"batches {args.batches}, {args.steps} DDIM steps, CFG, {len(jax.local_devices())} local device(s)")
    models = build_models(args)
    points = [bench_jax(args, models, size, b) for size in sizes for b in args.batches]
    best = {}
    for p in points:
        if p["size"] not in best or p["images_per_s"] > best[p["size"]]["images_per_s"]:
            best[p["size"]] = p
    for size, p in best.items():
        print(f"best batch at {size}²: {p['batch']} ({p['images_per_s']:.2f} images/s, {p['s_per_image']:.3f} s/image)")
    result = {"device": jax.devices()[0].device_kind, "devices": len(jax.local_devices()), "dtype": args.dtype,
              "steps": args.steps, "points": points, "best_batch": {str(k): v["batch"] for k, v in best.items()}}
    if not args.no_torch:
        size = sizes[0]
        b1 = next((p for p in points if p["size"] == size and p["batch"] == 1), None)
        for batch, ours in sorted({1: b1, best[size]["batch"]: best[size]}.items()):
            if ours is None:
                continue
            theirs = bench_torch(args, size, batch)
            if theirs is None:
                break
            result[f"diffusers_s_per_image_b{batch}"] = theirs
            print(f"ratio pasd-jax / diffusers at {size}² batch {batch} (s/image): {ours['s_per_image'] / theirs:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
