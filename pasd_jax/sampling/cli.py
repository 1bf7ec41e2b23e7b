"""Command line of `sample.py`: restore a file or a folder of images with a converted PASD model.

    python sample.py --ckpt converted/pasd --base majicmix --input photos/ --output out/
    python sample.py --demo                           # tiny built-in smoke model, generated image
    python sample.py --demo --input photos/           # the smoke model on your own images
    python sample.py --ckpt converted/stablesr --input lr/ --output sr/   # StableSR (auto-detected)
    python sample.py --demo --method stablesr         # StableSR smoke model
    python sample.py --ckpt converted/pasd --base sd15 --lcm-lora lcm-lora-sdv1-5.safetensors \
        --guidance-scale 1.5 --input photos/ --output out/   # LCM-LoRA: LCM scheduler, 4 steps

Every flag is checked before any model loads: a wrong value (out of range, nan, overlap ≥ tile, an
--output that is a file or cannot be created) is one `error:` line naming the flag, exit status 2.
A missing or corrupt model file (truncated weights, bad JSON, shapes that do not fit the config)
is one `error:` line naming the file, exit status 1.

Behaviour a batch user can rely on: outputs are `<output>/<input stem>.png` (or `--output x.png`
for a single input file); existing outputs are never replaced without `--overwrite` (checked before
any work; `--skip-existing` resumes an interrupted folder run); unreadable inputs are reported and
skipped and make the exit status 1 at the end; a seed gives identical output on every run; a
sidecar `<image>.txt` is that image's prompt; a progress bar shows per-image time; the summary
counts the files of a folder that were ignored for their extension.

Batches and processes (`pasd_jax.sampling.batching`): `--batch-size N` (default: the local device
count) restores up to N images of the same processed size in one compiled call, the image axis
split over the local devices; an image's output does not depend on N. In a multi-process job each
process restores its own share of the files (disjoint; README "Sampling on several processes").
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
from typing import Optional, Sequence

import jax
from tqdm import tqdm

from pasd_jax.assembly import defaults as assembly_defaults
from pasd_jax.assembly import home, loader
from pasd_jax.assembly.loader import load_models
from pasd_jax.diffusion.schedule import DDIM_DEFAULTS
from pasd_jax.imaging.io import ImageReadError, list_images, load_image, write_image
from pasd_jax.sampling import args as checks
from pasd_jax.sampling import batching, defaults, demo, precision, progress, stablesr_cli
from pasd_jax.sampling.pipeline import Restorer, RestoreOptions, join_prompt
from pasd_jax.train.sharding import maybe_initialize_distributed

IMAGE_SUFFIXES = checks.IMAGE_SUFFIXES

COLOR_FIX_HELP = ("colour correction of the output against the (upscaled) input: wavelet = keep the restored "
                  "detail (high frequencies) and take the low-frequency colour from the input; adain = match each "
                  "channel's mean and std to the input; none = the model's colours as they are (default: %(default)s)")
VAE_TILING_HELP = (f"encode/decode through the VAE in tiles with shared GroupNorm statistics, which bounds memory "
                   f"on big images: auto = only above {defaults.ENCODER_TILE} image px (encoder) / "
                   f"{defaults.DECODER_TILE} latent px (decoder); always; never (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    p = checks.SampleArgumentParser(prog="python sample.py", description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--ckpt", help="converted PASD checkpoint folder (python -m convert runs/pasd/checkpoint-N DST)")
    g.add_argument("--base", help="SD base: a name from `python -m convert list` or a converted pipeline folder; "
                                  "supplies the stock UNet weights, VAE, text encoder, tokenizer, scheduler")
    g.add_argument("--scheduler-config", help="scheduler_config.json (file or folder) overriding the checkpoint's "
                                              "and the base's (betas, spacing, prediction type)")
    g.add_argument("--lcm-lora", metavar="FILE", help="fuse this LCM-LoRA (diffusers/PEFT or kohya .safetensors) "
                                                      "into the UNet and sample with LCM (default 4 steps)")
    g.add_argument("--dtype", choices=defaults.DTYPES, default=defaults.DTYPE,
                   help="compute dtype of UNet and ControlNet; weights, VAE and text encoder stay float32; auto = "
                        "bfloat16 on GPU/TPU, float32 (the parity path) on CPU (default: %(default)s)")
    g.add_argument("--demo", action="store_true",
                   help=f"use the tiny built-in SMOKE model (random weights) on --input, or on a generated image "
                        f"(output default: {demo.DEMO_OUTPUT}/)")
    g.add_argument("--method", choices=stablesr_cli.METHODS, default="auto",
                   help="pasd or stablesr; auto (default): stablesr for a converted StableSR --ckpt, else pasd")
    g = p.add_argument_group("input / output")
    g.add_argument("--input", help="image file or folder (PNG/JPEG/WebP/BMP/TIFF; other files in a folder are ignored)")
    g.add_argument("--output", help="output folder (created), or an image path (.png/.jpg/.webp) for a single input")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    g.add_argument("--skip-existing", action="store_true", help="leave inputs whose output exists alone")
    g.add_argument("--no-progress", action="store_true",
                   help="no per-step progress bar (by default the compiled loop reports every denoising step)")
    g.add_argument("--batch-size", type=checks.BATCH_SIZE, default=None,
                   help="images of the same processed size restored together in one compiled call, split over "
                        "the local devices (rounded up to a multiple of their count; outputs do not depend on "
                        "it; default: the local device count)")
    g = p.add_argument_group("sampling (defaults: the paper's recipe)")
    g.add_argument("--prompt", default="", help="prompt for every image (joined with a sidecar <image>.txt)")
    g.add_argument("--added-prompt", default=defaults.ADDED_PROMPT, help="appended to every prompt (default: %(default)r)")
    g.add_argument("--negative-prompt", default=None,
                   help=f"default: {defaults.NEGATIVE_PROMPT!r} ({defaults.COLORIZE_NEGATIVE_PROMPT!r} with --mode colorize)")
    g.add_argument("--scheduler", choices=defaults.SCHEDULERS, default=None,
                   help="sampler (default: the checkpoint's or base's scheduler_config.json _class_name when "
                        "implemented, else ddim; lcm with --lcm-lora). The reference test_pasd.py uses unipc")
    g.add_argument("--steps", type=checks.STEPS, default=None,
                   help=f"scheduler steps, ≥ 1 (default: {defaults.STEPS}; {defaults.LCM_STEPS} with lcm)")
    g.add_argument("--guidance-scale", type=checks.GUIDANCE, default=defaults.GUIDANCE_SCALE,
                   help="classifier-free guidance scale, ≥ 0; ≤ 1 skips the negative branch (default: %(default)s)")
    g.add_argument("--conditioning-scale", type=checks.CONDITIONING, default=defaults.CONDITIONING_SCALE,
                   help="ControlNet residual scale, ≥ 0 (default: %(default)s)")
    g.add_argument("--added-noise-level", type=checks.NOISE_LEVEL, default=defaults.ADDED_NOISE_LEVEL,
                   help="adjustable noise schedule level a in [0, T-1] (T = the schedule's training steps, 1000 "
                        "for SD); 0 turns ANS off (default: %(default)s)")
    g.add_argument("--no-ans", action="store_true", help="same as --added-noise-level 0")
    g.add_argument("--init-with-noise", action="store_true", help="start from pure noise instead of the LQ latent")
    g.add_argument("--eta", type=checks.ETA, default=defaults.ETA, help="DDIM eta in [0, 1] (default: %(default)s)")
    g.add_argument("--ans-compat", choices=defaults.ANS_COMPATS, default=defaults.ANS_COMPAT,
                   help="ANS start: the paper's closed form (default), or the scheduler's own add_noise as "
                        "test_pasd.py does (UniPC: a level outside the schedule uses the last step)")
    g.add_argument("--seed", type=checks.SEED, default=defaults.SEED,
                   help=f"random seed in [0, {checks.MAX_SEED}]; same seed, same output (default: %(default)s)")
    g = p.add_argument_group("image processing")
    g.add_argument("--mode", choices=defaults.MODES, default=defaults.MODE,
                   help="realisr, or colorize (grayscale inputs) (default: %(default)s)")
    g.add_argument("--upscale", type=checks.UPSCALE, default=defaults.UPSCALE,
                   help=f"output = input size × upscale, 1..{checks.MAX_UPSCALE} (default: %(default)s)")
    g.add_argument("--process-size", type=checks.PROCESS_SIZE, default=None,
                   help=f"shorter side (px) the model runs at, at least; smaller inputs are enlarged for it "
                        f"(default: {defaults.PROCESS_SIZE}; {demo.SMOKE_PROCESS_SIZE} for smoke models)")
    g.add_argument("--color-fix", choices=defaults.COLOR_FIXES, default=defaults.COLOR_FIX, help=COLOR_FIX_HELP)
    g.add_argument("--tile-size", type=checks.TILE_SIZE, default=defaults.TILE_SIZE,
                   help="latent tile side (latent px = image px / 8); latents with more than tile-size² px are "
                        "tiled (default: %(default)s)")
    g.add_argument("--tile-overlap", type=checks.TILE_OVERLAP, default=defaults.TILE_OVERLAP,
                   help="latent tile overlap (latent px), < --tile-size (default: %(default)s)")
    g.add_argument("--tiles-per-call", type=checks.TILES_PER_CALL, default=defaults.TILES_PER_CALL,
                   help="tiles batched per network call (default: %(default)s)")
    g.add_argument("--vae-tiling", choices=defaults.VAE_TILINGS, default=defaults.VAE_TILING, help=VAE_TILING_HELP)
    stablesr_cli.add_arguments(p)
    return p


def _fail(message: str) -> int:
    """Print a one-line usage error; exit status 2 (argparse's)."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def plan_outputs(inputs: Sequence[pathlib.Path], output: str, single_file: bool) -> list[pathlib.Path]:
    """Output path of each input: `output/<stem>.png`, or `output` itself for one file named *.png etc."""
    out = pathlib.Path(output)
    if single_file and out.suffix.lower() in IMAGE_SUFFIXES and not out.is_dir():
        return [out]
    stems = {}
    for path in inputs:
        if path.stem in stems:
            raise ValueError(f"{path.name} and {stems[path.stem].name} would both be written to {out / (path.stem + '.png')}")
        stems[path.stem] = path
    return [out / f"{p.stem}.png" for p in inputs]


def ignored_files(folder: pathlib.Path, images: Sequence[pathlib.Path]) -> list[pathlib.Path]:
    """Regular, non-hidden files of `folder` that the scan left out for their extension (an image's
    sidecar prompt `<stem>.txt` is not counted: it is read)."""
    if not folder.is_dir():
        return []
    sidecars = {p.with_suffix(".txt") for p in images}
    taken = set(images)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p not in taken and p not in sidecars)


def read_prompt(path: pathlib.Path, cli_prompt: str) -> str:
    """Sidecar caption `<image>.txt` (if any) joined with the CLI prompt."""
    sidecar = path.with_suffix(".txt")
    caption = sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar.is_file() else ""
    return join_prompt(caption, cli_prompt)


def main(argv: Optional[Sequence[str]] = None, *, lora_fuser=None) -> int:
    """Run sample.py; `lora_fuser` (`convert.lora.fuse_lora_file`, given by sample.py) enables --lcm-lora."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        checks.check_args(args)
    except SystemExit as stop:  # argparse: --help (0) or a one-line flag error (2)
        return stop.code if isinstance(stop.code, int) else 0
    except checks.UsageError as err:
        return _fail(str(err))
    args.given = stablesr_cli.given_flags(sys.argv[1:] if argv is None else argv)
    method = stablesr_cli.resolve_method(args)
    if args.demo:
        args.output = args.output or demo.DEMO_OUTPUT
    input_path = pathlib.Path(args.input) if args.input else None
    if input_path is not None and not input_path.exists():
        return _fail(f"--input {str(input_path)!r} does not exist")
    try:
        checks.check_output(args.output, single_file=input_path is None or input_path.is_file())
        if method == "stablesr":
            if args.demo:
                print(stablesr_cli.SMOKE_BANNER, file=sys.stderr)
            elif not pathlib.Path(args.ckpt or "").is_dir():
                print(f"error: --ckpt: StableSR model folder not found: {args.ckpt}", file=sys.stderr)
                return 1
        elif args.demo:
            checks.check_schedule_flags(args, assembly_defaults.SCHEDULER["num_train_timesteps"], "the smoke model")
        else:
            if not pathlib.Path(args.ckpt).is_dir():
                print(f"error: --ckpt: PASD checkpoint folder not found: {args.ckpt}", file=sys.stderr)
                return 1
            base_dir = home.resolve_base(args.base) if args.base else None
            sched, where = loader.scheduler_config(args.ckpt, base_dir, args.scheduler_config)
            checks.check_schedule_flags(args, sched.get("num_train_timesteps", DDIM_DEFAULTS["num_train_timesteps"]),
                                        where)
    except checks.UsageError as err:
        return _fail(str(err))
    except (FileNotFoundError, ValueError) as err:  # --base / --scheduler: unknown, incomplete or corrupt
        print(f"error: {err}", file=sys.stderr)
        return 1

    if args.demo and input_path is None:
        input_path = demo.write_demo_input(pathlib.Path(args.output) / "input")
        print(f"demo input: {input_path} (generated; pass --input FILE_OR_FOLDER to try your own images)",
              file=sys.stderr)
    try:
        inputs = list_images(input_path)
        outputs = plan_outputs(inputs, args.output, input_path.is_file())
    except (FileNotFoundError, ValueError) as err:
        return _fail(str(err))
    ignored = ignored_files(input_path, inputs)
    maybe_initialize_distributed()  # a multi-process job: each process takes its own share of the files
    args.process = (jax.process_index(), jax.process_count())
    if args.process[1] > 1:
        pairs = batching.process_share(list(zip(inputs, outputs)), *args.process)
        inputs, outputs = [i for i, _ in pairs], [o for _, o in pairs]
        ignored = ignored if args.process[0] == 0 else []
    todo = [(i, o) for i, o in zip(inputs, outputs) if not (args.skip_existing and o.exists())]
    skipped = len(inputs) - len(todo)
    existing = [str(o) for _, o in todo if o.exists()]
    if existing and not args.overwrite:
        shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
        print(f"error: output exists: {shown}; pass --overwrite to replace or --skip-existing to keep", file=sys.stderr)
        return 1
    if method == "stablesr":
        return stablesr_cli.run(args, todo, skipped)
    return _run(args, todo, skipped, ignored, lora_fuser)


def restore_options(args, smoke: bool) -> RestoreOptions:
    """The flags as `RestoreOptions`; a smoke model runs at `demo.SMOKE_PROCESS_SIZE` unless --process-size."""
    process_size = args.process_size or (demo.SMOKE_PROCESS_SIZE if smoke else defaults.PROCESS_SIZE)
    return RestoreOptions(
        steps=defaults.STEPS if args.steps is None else args.steps,
        guidance_scale=args.guidance_scale, conditioning_scale=args.conditioning_scale,
        added_noise_level=0 if args.no_ans else args.added_noise_level,
        init="noise" if args.init_with_noise else "ans", eta=args.eta, upscale=args.upscale,
        process_size=process_size, color_fix=args.color_fix, mode=args.mode, added_prompt=args.added_prompt,
        negative_prompt=args.negative_prompt, tile_size=args.tile_size, tile_overlap=args.tile_overlap,
        tiles_per_call=args.tiles_per_call, vae_tiling=args.vae_tiling, scheduler=args.scheduler,
        ans_compat=args.ans_compat, progress=not getattr(args, "no_progress", False))


def cpu_hint(options: RestoreOptions, smoke: bool, backend: str) -> Optional[str]:
    """A one-line note when a CPU run will take minutes per image, naming the flags that make it fast."""
    if backend != "cpu":
        return None
    if smoke:
        if options.process_size <= demo.SMOKE_PROCESS_SIZE:
            return None
        return (f"note: the smoke model on CPU at --process-size {options.process_size} takes minutes per image; "
                f"--process-size {demo.SMOKE_PROCESS_SIZE} (its default) takes seconds")
    return (f"note: running on CPU: expect minutes per image at process size {options.process_size} with "
            f"{options.steps} steps; --process-size 512 --steps 10 --guidance-scale 1 is several times faster "
            f"(a GPU or TPU far more)")


def _summary(done: int, times: list, skipped: int, ignored: list, failed: list, total: float) -> str:
    summary = f"restored {done} image{'s' * (done != 1)}"
    if len(times) == 1:
        summary += f" ({times[0]:.2f} s, including compilation)"
    elif times:
        rest = sorted(times[1:])
        summary += (f" (median {rest[len(rest) // 2]:.2f} s/image over all but the first; "
                    f"the first took {times[0]:.2f} s including compilation)")
    if skipped:
        summary += f", skipped {skipped} existing"
    if ignored:
        names = ", ".join(p.name for p in ignored[:3]) + (f" and {len(ignored) - 3} more" if len(ignored) > 3 else "")
        summary += f", ignored {len(ignored)} non-image file{'s' * (len(ignored) != 1)} ({names})"
    if failed:
        summary += f", FAILED {len(failed)}: {', '.join(str(f) for f in failed)}"
    return summary + f"; total {total:.1f} s"


def _run(args, todo, skipped: int, ignored: list, lora_fuser=None) -> int:
    t0 = time.perf_counter()
    if args.demo:
        print(demo.SMOKE_BANNER, file=sys.stderr)
    dtype = precision.compute_dtype(args.dtype)
    try:
        if args.demo:
            models = load_models(demo.demo_model_dir(), dtype=dtype)
        else:
            models = load_models(args.ckpt, args.base, scheduler=args.scheduler_config, lcm_lora=args.lcm_lora,
                                 lora_fuser=lora_fuser, dtype=dtype)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    options = restore_options(args, models.smoke)
    scheduler = options.scheduler or models.default_scheduler
    if args.steps is None and scheduler == "lcm":
        options = dataclasses.replace(options, steps=defaults.LCM_STEPS)
    print(f"loaded {models.family} PASD from {models.source} in {time.perf_counter() - t0:.1f} s"
          + (" (SMOKE MODEL, random weights)" if models.smoke else "")
          + f"; {scheduler}, {options.steps} steps; {precision.describe(args.dtype, jax.default_backend())}",
          file=sys.stderr)
    if models.smoke and args.process_size is None:
        print(f"smoke model: processing at {options.process_size} px (the SD default {defaults.PROCESS_SIZE} "
              f"takes minutes per image on a CPU; --process-size to change)", file=sys.stderr)
    hint = cpu_hint(options, models.smoke, jax.default_backend())
    if hint:
        print(hint, file=sys.stderr)
    try:
        restorer = Restorer(models, options)
    except ValueError as err:  # e.g. --eta with a non-DDIM scheduler, an unsupported scheduler config
        print(f"error: {err}", file=sys.stderr)
        return 1
    devices = jax.local_device_count()
    batch_size = args.batch_size or devices
    call = batching.call_size(batch_size, devices)
    state = _RunState(args, options, restorer, call, tqdm(total=len(todo), unit="img", file=sys.stderr,
                                                          disable=not todo))
    batcher = batching.SizeBatcher(batch_size)
    for src, dst in todo:
        state.bar.set_postfix_str(src.name)
        try:
            loaded = load_image(src)
            item = restorer.prepare(loaded.rgb, prompt=read_prompt(src, args.prompt), seed=args.seed)
        except (ImageReadError, ValueError, OSError) as err:
            state.fail([src], err)
            continue
        for group in batcher.add(item.shape, (src, dst, item)):
            state.run(group)
    for group in batcher.flush():
        state.run(group)
    state.bar.close()
    where = f"process {args.process[0]} of {args.process[1]}: " if args.process[1] > 1 else ""
    print(where + _summary(state.done, state.times, skipped, ignored, state.failed, time.perf_counter() - t0),
          file=sys.stderr)
    return 1 if state.failed else 0


class _RunState:
    """Counters of one folder run and the restoring and writing of one batch."""

    def __init__(self, args, options: RestoreOptions, restorer: Restorer, call: int, bar):
        self.args, self.options, self.restorer, self.call, self.bar = args, options, restorer, call, bar
        self.done, self.failed, self.times = 0, [], []

    def fail(self, sources: list, err: Exception) -> None:
        for src in sources:
            self.failed.append(src)
            tqdm.write(f"error: {src}: {err}", file=sys.stderr)
        self.bar.update(len(sources))

    def run(self, group: list) -> None:
        """Restore one group of (src, dst, Prepared) of one processed size and write its outputs."""
        names = group[0][0].name + (f" +{len(group) - 1}" if len(group) > 1 else "")
        try:
            with progress.listen(progress.StepBar(self.options.steps, desc=f"  {names}",
                                                  disable=self.args.no_progress)):
                results = self.restorer.restore_batch([item for _, _, item in group], self.call)
        except (ValueError, OSError) as err:
            self.fail([src for src, _, _ in group], err)
            return
        for (src, dst, _), result in zip(group, results):
            try:
                dst.parent.mkdir(parents=True, exist_ok=True)
                write_image(dst, result.image, overwrite=self.args.overwrite)
            except (ValueError, FileExistsError, OSError) as err:
                self.fail([src], err)
                continue
            self.done += 1
            self.times.append(result.seconds)
            self.bar.update(1)
            (pw, ph), (oh, ow) = result.processed_size, result.image.shape[:2]
            batch = f", batch of {result.batch}" if result.batch > 1 else ""
            tqdm.write(f"{src.name} -> {dst} (processed at {pw}x{ph} px, written {ow}x{oh} px, "
                       f"{result.seconds:.2f} s{batch})", file=sys.stderr)
