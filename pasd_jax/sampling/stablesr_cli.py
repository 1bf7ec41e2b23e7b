"""The StableSR half of `sample.py` (`--method stablesr`, or auto-detected from a converted folder).

Same folder / output / seed / overwrite behaviour as the PASD path (`pasd_jax.sampling.cli` plans
the outputs and checks them before any work); this module adds the StableSR options and the
restore loop. Defaults are those of the reference's recommended script,
`scripts/sr_val_ddpm_text_T_vqganfin_oldcanvas_tile.py` (STABLESR_REFERENCE §8.5): 1000 DDPM
steps, --dec-w 0.5, --upscale 4, --input-size 512, --tile-overlap 32 (latent px), colour fix
nofix, --vqgantile-size 1280 / --vqgantile-stride 1000 (px), seed 42. `--sr-script old` runs
`sr_val_ddpm_text_T_vqganfin_old.py` instead (input_size² crops, pure-noise start). Outputs are
8-bit PNGs truncated like the scripts' `astype(uint8)` (quirk §10.12). Every image (every VQGAN
patch, as `seed_everything` in the script) starts its noise stream from --seed.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from pasd_jax.sampling import defaults

SCRIPT_DEFAULTS = defaults.STABLESR
#: `--demo --method stablesr`: small enough for a CPU, with VQGAN pixel tiling (4 patches) and a
#: 3×3 latent canvas per patch on the 192² demo image.
DEMO_DEFAULTS = dict(SCRIPT_DEFAULTS, ddpm_steps=4, upscale=1, input_size=64, tile_overlap=4, vqgantile_size=128,
                     vqgantile_stride=64, color_fix="wavelet")
SMOKE_BANNER = ("SMOKE MODEL: tiny built-in StableSR with random weights — this checks that the StableSR pipeline "
                "runs; the output is NOT a restoration. Use --ckpt with a converted StableSR model for real results.")
METHODS = ("auto", "pasd", "stablesr")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "StableSR (--method stablesr; defaults: scripts/sr_val_ddpm_text_T_vqganfin_oldcanvas_tile.py)")
    g.add_argument("--ddpm-steps", type=int, default=None, help="respaced DDPM steps (default 1000; the StableSR "
                                                                "README uses 200)")
    g.add_argument("--dec-w", type=float, default=None, help="CFW fusion weight w in [0, 1] (default 0.5)")
    g.add_argument("--input-size", type=int, default=None, help="pixel side of one latent canvas tile (default 512)")
    g.add_argument("--vqgantile-size", type=int, default=None, help="VQGAN pixel patch size (default 1280)")
    g.add_argument("--vqgantile-stride", type=int, default=None, help="VQGAN pixel patch stride (default 1000)")
    g.add_argument("--sr-script", choices=("tile", "old"), default=None,
                   help="tile: ..._oldcanvas_tile.py (default); old: ..._old.py (input-size² centre crops)")


def resolve_method(args) -> str:
    """"pasd" or "stablesr": --method, else a converted StableSR --ckpt folder means stablesr."""
    if args.method != "auto":
        return args.method
    if args.ckpt and not args.demo:
        from pasd_jax.assembly.stablesr import is_stablesr_folder

        return "stablesr" if is_stablesr_folder(args.ckpt) else "pasd"
    return "pasd"


#: Flags shared with PASD: their parsed value counts only when given on the command line.
SHARED = ("seed", "upscale", "color_fix", "tile_overlap", "tiles_per_call")


def given_flags(argv) -> set[str]:
    """Destination names of the `--flags` present in argv."""
    return {tok[2:].split("=")[0].replace("-", "_") for tok in argv if str(tok).startswith("--")}


def _value(args, name: str):
    given = getattr(args, name, None)
    if name in SHARED and name not in getattr(args, "given", {name}):
        given = None
    return given if given is not None else (DEMO_DEFAULTS if args.demo else SCRIPT_DEFAULTS)[name]


def options_from_args(args):
    """StableSROptions from the parsed flags (raises ValueError on bad values)."""
    from pasd_jax.sampling.stablesr_pipeline import StableSROptions

    fix = _value(args, "color_fix")
    options = StableSROptions(
        ddpm_steps=_value(args, "ddpm_steps"), dec_w=_value(args, "dec_w"),
        colorfix_type="nofix" if fix == "none" else fix, upscale=float(_value(args, "upscale")),
        input_size=_value(args, "input_size"), tile_overlap=_value(args, "tile_overlap"),
        vqgantile_size=_value(args, "vqgantile_size"), vqgantile_stride=_value(args, "vqgantile_stride"),
        tiles_per_call=_value(args, "tiles_per_call"))
    if not 1 <= options.ddpm_steps <= 1000:
        raise ValueError(f"--ddpm-steps must be in [1, 1000], got {options.ddpm_steps}")
    if options.input_size % 8:
        raise ValueError(f"--input-size must be a multiple of 8, got {options.input_size}")
    if not 0 <= options.tile_overlap < options.input_size // 8:
        raise ValueError(f"--tile-overlap must be in [0, input_size/8), got {options.tile_overlap}")
    if options.upscale <= 0 or options.vqgantile_size < 8 or options.vqgantile_stride < 1:
        raise ValueError("--upscale, --vqgantile-size and --vqgantile-stride must be positive")
    return options


def run(args, todo, skipped: int) -> int:
    """Restore `todo` [(input, output)] with StableSR; the exit status as the PASD path's."""
    from tqdm import tqdm

    from pasd_jax.imaging.color_fix import to_uint8_truncate
    from pasd_jax.imaging.io import ImageReadError, load_image, write_image
    from pasd_jax.assembly.stablesr import load_stablesr
    from pasd_jax.fixtures.stablesr_tiny import smoke_model_dir
    from pasd_jax.sampling.stablesr_pipeline import SeededNoise, restore_old, restore_tile
    from pasd_jax.sampling.stablesr_preprocess import load_img_old, read_image_tile

    try:
        options = options_from_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    script, seed = _value(args, "sr_script"), _value(args, "seed")
    t0 = time.perf_counter()
    try:
        models = load_stablesr(smoke_model_dir() if args.demo else args.ckpt)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if models.smoke:  # tiny networks: XLA's optimisation passes cost more compile time than they save
        import jax

        jax.config.update("jax_disable_most_optimizations", True)
    print(f"loaded StableSR from {models.source} in {time.perf_counter() - t0:.1f} s"
          + (" (SMOKE MODEL, random weights)" if models.smoke else "")
          + f"; {script} script, {options.ddpm_steps} DDPM steps, w {options.dec_w}, colour fix "
            f"{options.colorfix_type}, seed {seed}", file=sys.stderr)
    done, failed, times = 0, [], []
    bar = tqdm(todo, unit="img", file=sys.stderr, disable=not todo)
    for src, dst in bar:
        bar.set_postfix_str(src.name)
        start = time.perf_counter()
        try:
            rgb = load_image(src).rgb
            if script == "old":
                out = restore_old(models, load_img_old(rgb, options.input_size)[None], options, SeededNoise(seed))
            else:
                out = restore_tile(models, read_image_tile(rgb)[None], options, SeededNoise(seed),
                                   progress=lambda i, n: bar.set_postfix_str(f"{src.name} patch {i}/{n}"))
            image = to_uint8_truncate(out["image"][0])
            dst.parent.mkdir(parents=True, exist_ok=True)
            write_image(dst, np.asarray(image), overwrite=args.overwrite)
        except (ImageReadError, ValueError, FileExistsError, OSError) as err:
            failed.append(src)
            tqdm.write(f"error: {src}: {err}", file=sys.stderr)
            continue
        done += 1
        times.append(time.perf_counter() - start)
        tqdm.write(f"{src.name} -> {dst} ({image.shape[1]}x{image.shape[0]} px, {times[-1]:.2f} s)", file=sys.stderr)
    bar.close()
    summary = f"restored {done} image{'s' * (done != 1)} with StableSR"
    if times:
        summary += f" (median {sorted(times)[len(times) // 2]:.2f} s/image; the first includes compilation)"
    if skipped:
        summary += f", skipped {skipped} existing"
    if failed:
        summary += f", FAILED {len(failed)}: {', '.join(str(f) for f in failed)}"
    print(summary + f"; total {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 1 if failed else 0
