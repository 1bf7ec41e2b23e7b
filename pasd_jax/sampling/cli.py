"""Command line of `sample.py`: restore a file or a folder of images with a converted PASD model.

    python sample.py --ckpt converted/pasd --base majicmix --input photos/ --output out/
    python sample.py --demo --output demo_out        # tiny built-in smoke model, generated image
    python sample.py --ckpt converted/pasd --base sd15 --lcm-lora lcm-lora-sdv1-5.safetensors \
        --guidance-scale 1.5 --input photos/ --output out/   # LCM-LoRA: LCM scheduler, 4 steps

Behaviour a batch user can rely on: outputs are `<output>/<input stem>.png` (or `--output x.png`
for a single input file); existing outputs are never replaced without `--overwrite` (checked before
any work; `--skip-existing` resumes an interrupted folder run); unreadable inputs are reported and
skipped and make the exit status 1 at the end; a seed gives identical output on every run; a
sidecar `<image>.txt` is that image's prompt; a progress bar shows per-image time.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
from typing import Optional, Sequence

import jax.numpy as jnp
from tqdm import tqdm

from pasd_jax.assembly.loader import load_models
from pasd_jax.imaging.io import ImageReadError, list_images, load_image, write_image
from pasd_jax.sampling import defaults, demo
from pasd_jax.sampling.pipeline import Restorer, RestoreOptions, join_prompt

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python sample.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--ckpt", help="converted PASD checkpoint folder (python -m convert runs/pasd/checkpoint-N DST)")
    g.add_argument("--base", help="SD base: a name from `python -m convert list` or a converted pipeline folder; "
                                  "supplies the stock UNet weights, VAE, text encoder, tokenizer, scheduler")
    g.add_argument("--scheduler-config", help="scheduler_config.json (file or folder) overriding the checkpoint's "
                                              "and the base's (betas, spacing, prediction type)")
    g.add_argument("--lcm-lora", metavar="FILE", help="fuse this LCM-LoRA (diffusers/PEFT or kohya .safetensors) "
                                                      "into the UNet and sample with LCM (default 4 steps)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype of UNet and ControlNet (weights stay float32)")
    g.add_argument("--demo", action="store_true", help="run on a generated image with the tiny built-in SMOKE model")
    g = p.add_argument_group("input / output")
    g.add_argument("--input", help="image file or folder (PNG/JPEG/WebP/BMP/TIFF)")
    g.add_argument("--output", help="output folder (created), or an image path for a single input")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    g.add_argument("--skip-existing", action="store_true", help="leave inputs whose output exists alone")
    g = p.add_argument_group("sampling (defaults: the paper's recipe)")
    g.add_argument("--prompt", default="", help="prompt for every image (joined with a sidecar <image>.txt)")
    g.add_argument("--added-prompt", default=defaults.ADDED_PROMPT, help="appended to every prompt (default: %(default)r)")
    g.add_argument("--negative-prompt", default=None, help="default: the paper's (colorize: 'b&w, color bleeding')")
    g.add_argument("--scheduler", choices=defaults.SCHEDULERS, default=None,
                   help="sampler (default: the checkpoint's or base's scheduler_config.json _class_name when "
                        "implemented, else ddim; lcm with --lcm-lora). The reference test_pasd.py uses unipc")
    g.add_argument("--steps", type=int, default=None,
                   help=f"scheduler steps (default {defaults.STEPS}; {defaults.LCM_STEPS} with lcm)")
    g.add_argument("--guidance-scale", type=float, default=defaults.GUIDANCE_SCALE, help="CFG scale; ≤ 1 skips the negative branch")
    g.add_argument("--conditioning-scale", type=float, default=defaults.CONDITIONING_SCALE, help="ControlNet residual scale")
    g.add_argument("--added-noise-level", type=int, default=defaults.ADDED_NOISE_LEVEL, help="ANS level a (0 turns ANS off)")
    g.add_argument("--no-ans", action="store_true", help="same as --added-noise-level 0")
    g.add_argument("--init-with-noise", action="store_true", help="start from pure noise instead of the LQ latent")
    g.add_argument("--eta", type=float, default=defaults.ETA, help="DDIM eta")
    g.add_argument("--ans-compat", choices=defaults.ANS_COMPATS, default=defaults.ANS_COMPAT,
                   help="ANS start: the paper's closed form (default), or the scheduler's own add_noise as "
                        "test_pasd.py does (UniPC: a level outside the schedule uses the last step)")
    g.add_argument("--seed", type=int, default=defaults.SEED, help="random seed (same seed, same output)")
    g = p.add_argument_group("image processing")
    g.add_argument("--mode", choices=defaults.MODES, default=defaults.MODE, help="realisr, or colorize (grayscale inputs)")
    g.add_argument("--upscale", type=int, default=defaults.UPSCALE, help="output = input size × upscale")
    g.add_argument("--process-size", type=int, default=defaults.PROCESS_SIZE, help="shorter side the model runs at (min)")
    g.add_argument("--color-fix", choices=defaults.COLOR_FIXES, default=defaults.COLOR_FIX)
    g.add_argument("--tile-size", type=int, default=defaults.TILE_SIZE, help="latent tile side (latent px) for big images")
    g.add_argument("--tile-overlap", type=int, default=defaults.TILE_OVERLAP, help="latent tile overlap (latent px)")
    g.add_argument("--tiles-per-call", type=int, default=defaults.TILES_PER_CALL, help="tiles batched per network call")
    g.add_argument("--vae-tiling", choices=defaults.VAE_TILINGS, default=defaults.VAE_TILING)
    return p


def _fail(message: str) -> int:
    """Print a one-line usage error; exit status 2 (argparse's)."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def plan_outputs(inputs: Sequence[pathlib.Path], output: str, single_file: bool) -> list[pathlib.Path]:
    """Output path of each input: `output/<stem>.png`, or `output` itself for one file named *.png etc."""
    out = pathlib.Path(output)
    if single_file and out.suffix.lower() in IMAGE_SUFFIXES:
        return [out]
    stems = {}
    for path in inputs:
        if path.stem in stems:
            raise ValueError(f"{path.name} and {stems[path.stem].name} would both be written to {out / (path.stem + '.png')}")
        stems[path.stem] = path
    return [out / f"{p.stem}.png" for p in inputs]


def read_prompt(path: pathlib.Path, cli_prompt: str) -> str:
    """Sidecar caption `<image>.txt` (if any) joined with the CLI prompt."""
    sidecar = path.with_suffix(".txt")
    caption = sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar.is_file() else ""
    return join_prompt(caption, cli_prompt)


def main(argv: Optional[Sequence[str]] = None, *, lora_fuser=None) -> int:
    """Run sample.py; `lora_fuser` (`convert.lora.fuse_lora_file`, given by sample.py) enables --lcm-lora."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        args.output = args.output or "demo_out"
        args.input = str(demo.write_demo_input(pathlib.Path(args.output) / "input"))
        args.process_size = min(args.process_size, 192)
        print(demo.SMOKE_BANNER, file=sys.stderr)
    elif not args.ckpt:
        return _fail("--ckpt is required (or --demo for the built-in smoke model)")
    if not args.input or not args.output:
        return _fail("--input and --output are required")
    try:
        options = RestoreOptions(
            steps=defaults.STEPS if args.steps is None else args.steps,
            guidance_scale=args.guidance_scale, conditioning_scale=args.conditioning_scale,
            added_noise_level=0 if args.no_ans else args.added_noise_level,
            init="noise" if args.init_with_noise else "ans", eta=args.eta, upscale=args.upscale,
            process_size=args.process_size, color_fix=args.color_fix, mode=args.mode, added_prompt=args.added_prompt,
            negative_prompt=args.negative_prompt, tile_size=args.tile_size, tile_overlap=args.tile_overlap,
            tiles_per_call=args.tiles_per_call, vae_tiling=args.vae_tiling, scheduler=args.scheduler,
            ans_compat=args.ans_compat)
    except ValueError as err:
        return _fail(str(err))

    try:
        inputs = list_images(args.input)
        outputs = plan_outputs(inputs, args.output, pathlib.Path(args.input).is_file())
    except (FileNotFoundError, ValueError) as err:
        return _fail(str(err))
    todo = [(i, o) for i, o in zip(inputs, outputs) if not (args.skip_existing and o.exists())]
    skipped = len(inputs) - len(todo)
    existing = [str(o) for _, o in todo if o.exists()]
    if existing and not args.overwrite:
        shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        print(f"error: output exists: {shown}; pass --overwrite to replace or --skip-existing to keep", file=sys.stderr)
        return 1
    return _run(args, options, todo, skipped, lora_fuser)


def _run(args, options: RestoreOptions, todo, skipped: int, lora_fuser=None) -> int:
    t0 = time.perf_counter()
    try:
        if args.demo:
            models = load_models(demo.demo_model_dir())
        else:
            models = load_models(args.ckpt, args.base, scheduler=args.scheduler_config, lcm_lora=args.lcm_lora,
                                 lora_fuser=lora_fuser, dtype=jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    scheduler = options.scheduler or models.default_scheduler
    if args.steps is None and scheduler == "lcm":
        options = dataclasses.replace(options, steps=defaults.LCM_STEPS)
    print(f"loaded {models.family} PASD from {models.source} in {time.perf_counter() - t0:.1f} s"
          + (" (SMOKE MODEL, random weights)" if models.smoke else "")
          + f"; {scheduler}, {options.steps} steps", file=sys.stderr)
    try:
        restorer = Restorer(models, options)
    except ValueError as err:  # e.g. --eta with a non-DDIM scheduler, an unsupported scheduler config
        print(f"error: {err}", file=sys.stderr)
        return 1
    done, failed, times = 0, [], []
    bar = tqdm(todo, unit="img", file=sys.stderr, disable=not todo)
    for src, dst in bar:
        bar.set_postfix_str(src.name)
        try:
            loaded = load_image(src)
            result = restorer.restore(loaded.rgb, prompt=read_prompt(src, args.prompt), seed=args.seed)
            dst.parent.mkdir(parents=True, exist_ok=True)
            write_image(dst, result.image, overwrite=args.overwrite)
        except (ImageReadError, ValueError, FileExistsError, OSError) as err:
            failed.append(src)
            tqdm.write(f"error: {src}: {err}", file=sys.stderr)
            continue
        done += 1
        times.append(result.seconds)
        tqdm.write(f"{src.name} -> {dst} ({result.processed_size[0]}x{result.processed_size[1]} px, "
                   f"{result.seconds:.2f} s)", file=sys.stderr)
    bar.close()
    summary = f"restored {done} image{'s' * (done != 1)}"
    if times:
        summary += f" (median {sorted(times)[len(times) // 2]:.2f} s/image; the first includes compilation)"
    if skipped:
        summary += f", skipped {skipped} existing"
    if failed:
        summary += f", FAILED {len(failed)}: {', '.join(str(f) for f in failed)}"
    print(summary + f"; total {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 1 if failed else 0
