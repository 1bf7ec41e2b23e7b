"""Sampling speed: our compiled PASD sampler vs diffusers' StableDiffusionControlNetPipeline.

SD1.5-size random weights, one image, `--size`² pixels, `--steps` DDIM steps with CFG (batch 2
per network call), VAE encode (ANS init) and decode included. Prints compile time (first call),
median seconds per image over `--repeats` further calls, and peak device memory; then the same for
diffusers (stock ControlNet + stock UNet: PASD's PACA and DR net are extra work on our side) when
torch and diffusers are importable, and the ratio. Runs on whatever device JAX/torch find.

    python benchmarks/sample.py                        # SD1.5 size, 512², 20 steps, 5 repeats
    python benchmarks/sample.py --tiny --size 128      # smoke run on a CPU
"""

from __future__ import annotations

import argparse
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
from pasd_jax.fixtures import sd15, tiny
from pasd_jax.perf import model_flops, peak
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


def bench_jax(args, models: PASDBundle) -> float:
    sampler = Sampler(models, SamplerSettings(num_steps=args.steps, vae_tiling="never", latent_tiling=False))
    rng = np.random.default_rng(0)
    lq = rng.random((1, args.size, args.size, 3), dtype=np.float32)
    text = rng.standard_normal((2, 77, models.text_encoder.hidden_size)).astype(np.float32)

    def inputs_for(seed: int):
        noises = Noises.draw(jax.random.key(seed), latent_shape(models, lq.shape))
        return make_inputs(lq, text, noises, guidance_scale=9.0)

    start = time.perf_counter()
    compiled = sampler._sample.lower(models.params, inputs_for(0)).compile()  # the program __call__ runs
    compile_s = time.perf_counter() - start
    ma = compiled.memory_analysis()
    footprint = (ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes) / 2**30
    run = lambda seed: np.asarray(compiled(models.params, inputs_for(seed))["image"])  # incl. device -> host
    run(0)  # first run: allocations, autotuning
    times = []
    for i in range(args.repeats):
        start = time.perf_counter()
        run(i + 1)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(f"pasd-jax  ({jax.devices()[0].device_kind}, {args.dtype}): compile {compile_s:.1f} s, "
          f"{median:.3f} s/image (median of {args.repeats}), program footprint {footprint:.2f} GiB "
          f"(weights {ma.argument_size_in_bytes / 2**30:.2f} + temp {ma.temp_size_in_bytes / 2**30:.2f}), "
          f"peak {_jax_peak_gb()} (includes autotuning scratch)")
    flops = model_flops.sampler_flops(sampler, args.size)
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    print(f"pasd-jax  counted {flops / 1e12:.2f} TFLOP/image: "
          f"{peak.describe(flops, median, peak.peak_tflops(dtype=dtype, override=args.peak_tflops))}")
    return median


def bench_torch(args) -> float | None:
    try:
        import diffusers
        import torch
    except ImportError:
        print("diffusers/torch not importable: skipping the PyTorch comparison")
        return None
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    cfgs = tiny.tiny_configs("stock") if args.tiny else sd15.configs("stock")
    clean = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**clean(cfgs["unet"]))
    controlnet = diffusers.ControlNetModel.from_unet(unet)
    if args.tiny:
        controlnet = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 24, 32))
    vae = diffusers.AutoencoderKL(**clean(cfgs["vae"]))
    import transformers
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**{
        k: v for k, v in cfgs["text_encoder"].items() if k not in ("architectures", "model_type")}))
    scheduler = diffusers.DDIMScheduler(**clean(defaults.SCHEDULER))
    pipe = diffusers.StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet, controlnet=controlnet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).to(dev, dtype)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    image = torch.rand((1, 3, args.size, args.size), generator=gen).to(dev, dtype)
    dim = cfgs["text_encoder"]["hidden_size"]
    emb = torch.randn((1, 77, dim), generator=gen).to(dev, dtype)
    neg = torch.randn((1, 77, dim), generator=gen).to(dev, dtype)

    def run():
        with torch.no_grad():
            pipe(prompt_embeds=emb, negative_prompt_embeds=neg, image=image, num_inference_steps=args.steps,
                 guidance_scale=9.0, height=args.size, width=args.size, output_type="np")
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
    median = statistics.median(times)
    peak = (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB device" if dev == "cuda"
            else f"{_peak_rss_gb():.2f} GiB host RSS (both runs)")
    print(f"diffusers {diffusers.__version__} ({dev}, {args.dtype}, stock ControlNet pipeline, txt2img from noise): "
          f"first call {first:.1f} s, {median:.3f} s/image (median of {args.repeats}), peak {peak}")
    return median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--family", choices=("pasd", "pasd_light"), default="pasd")
    ap.add_argument("--tiny", action="store_true", help="tiny smoke model instead of SD1.5 size")
    ap.add_argument("--no-torch", action="store_true")
    peak.add_argument(ap)
    args = ap.parse_args()
    print(f"PASD sampling benchmark: {'tiny' if args.tiny else 'SD1.5-size'} random weights, {args.size}², "
          f"{args.steps} DDIM steps, CFG, batch 1")
    ours = bench_jax(args, build_models(args))
    theirs = None if args.no_torch else bench_torch(args)
    if theirs:
        print(f"ratio pasd-jax / diffusers: {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
