"""Counted FLOPs of the SD1.5-size PASD networks, the sampler and the training step.

Counted from the jaxpr (`pasd_jax.perf.flops`, 2 FLOPs per multiply-add, dots, convolutions and
fused attention; no XLA cost analysis) on abstract parameters: no weights are made, nothing runs,
so this takes seconds on any machine. Network figures are one forward at `--batch` latents of
`--latent`² (image side 8·latent); `sample_tflops_per_image` is one whole sampler call (VAE encode,
`--steps` CFG steps of ControlNet + PASD UNet at batch 2, VAE decode) per image, and
`train_step_tflops_per_image` the training step (forward + backward + AdamW) per image. The last
line printed is one JSON object.

    python benchmarks/flops.py [--latent 64] [--batch 1] [--family pasd|pasd_light] [--steps 20]
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from pasd_jax.diffusion.schedule import NoiseSchedule
from pasd_jax.models import registry, sd15
from pasd_jax.perf import model_flops
from pasd_jax.sampling.loader import PASDModels
from pasd_jax.sampling.sampler import Sampler, SamplerSettings
from pasd_jax.train.step import Models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", type=int, default=64, help="latent side (image side is 8×)")
    ap.add_argument("--batch", type=int, default=1, help="latents per network call")
    ap.add_argument("--family", choices=("pasd", "pasd_light"), default="pasd")
    ap.add_argument("--steps", type=int, default=20, help="sampler steps")
    ap.add_argument("--no-train", action="store_true", help="skip the training-step count")
    args = ap.parse_args()
    cfgs = sd15.configs(args.family)
    modules = {name: registry.build_module(cfg) for name, cfg in cfgs.items()}
    stock = registry.build_module(sd15.configs("stock")["unet"])
    lat, b = args.latent, args.batch
    image = lat * modules["vae"].downscale
    g = lambda n: round(n / 1e9, 3)
    out = {
        "latent": lat, "batch": b, "image": image, "family": args.family,
        "pasd_unet_gflops": g(model_flops.unet_flops(modules["unet"], lat, b)),
        "pasd_controlnet_gflops": g(model_flops.controlnet_flops(modules["controlnet"], lat, b)),
        "stock_unet_gflops": g(model_flops.unet_flops(stock, lat, b, residuals=False)),
        "vae_encode_gflops": g(model_flops.vae_encode_flops(modules["vae"], image, b)),
        "vae_decode_gflops": g(model_flops.vae_decode_flops(modules["vae"], lat, b)),
    }
    # torch's flop_counter has no rule for the fused SDPA kernel on a CPU: what it prints there is
    # our count minus the attention core (q·kᵀ, p·v); kept apart to compare with such figures.
    attention = {
        "pasd_unet": model_flops.unet_flops(modules["unet"], lat, b, attention=True),
        "pasd_controlnet": model_flops.controlnet_flops(modules["controlnet"], lat, b, attention=True),
        "stock_unet": model_flops.unet_flops(stock, lat, b, residuals=False, attention=True),
        "vae_encode": model_flops.vae_encode_flops(modules["vae"], image, b, attention=True),
        "vae_decode": model_flops.vae_decode_flops(modules["vae"], lat, b, attention=True),
    }
    print(f"{'network':18s} {'GFLOP':>10s} {'of which attention':>19s} {'without it':>11s}")
    for name, att in attention.items():
        total = out[f"{name}_gflops"]
        out[f"{name}_attention_gflops"] = g(att)
        print(f"{name:18s} {total:10.1f} {att / 1e9:19.1f} {total - att / 1e9:11.1f}")
    params = {name: registry.abstract_params(m) for name, m in modules.items()}
    schedule = NoiseSchedule.from_config(sd15.SCHEDULER)
    models = PASDModels(params=params, tokenizer=None, schedule=schedule, family=args.family, source="abstract",
                        **modules)
    settings = SamplerSettings(num_steps=args.steps, vae_tiling="never", tile_size=1 << 20)
    sample = model_flops.sampler_flops(Sampler(models, settings), image, b)
    out["sample_tflops_per_image"] = round(sample / b / 1e12, 4)
    print(f"sampler ({args.steps} steps, CFG)   {sample / b / 1e12:12.2f} TFLOP/image")
    if not args.no_train:
        train = model_flops.train_step_flops(Models(**{k: modules[k] for k in Models._fields}), schedule, image, b)
        out["train_step_tflops_per_image"] = round(train / b / 1e12, 4)
        print(f"train step (fwd+bwd)     {train / b / 1e12:12.2f} TFLOP/image")
    print(json.dumps(out))


if __name__ == "__main__":
    np.seterr(all="ignore")
    jax.config.update("jax_platforms", "cpu")
    main()
