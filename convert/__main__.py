"""Command line: `python -m convert SRC DST [--overwrite]`, plus `base`, `list` and `export`.

Converts PyTorch diffusers/transformers folders and single-file SD checkpoints into Flax folders
that `pasd_jax` loads without torch (see `convert.core`, `convert.single_file`). The default
command takes SRC DST; named subcommands (`convert.commands`) register in `SUBCOMMANDS` and are
dispatched on the first argument, so `python -m convert SRC DST` keeps working beside them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Sequence

from convert import commands, core, torch_io
from convert.mapping import ConversionError

EPILOG = """\
SRC may be:
  * a single-file SD1.x/SD2.x checkpoint (A1111 / civitai .safetensors, .ckpt, .pt) in the
    original LDM layout: converted into DST/unet, vae, text_encoder (+ tokenizer, scheduler);
  * one component folder, as saved by diffusers/transformers `save_pretrained`
    (config.json + diffusion_pytorch_model.safetensors / model.safetensors / *.bin):
    a UNet2DConditionModel (stock, PASD or PASD-light; detected from the weights),
    an AutoencoderKL, a ControlNetModel (PASD), or a transformers CLIPTextModel;
  * a diffusers pipeline folder (model_index.json): its unet/, vae/, text_encoder/ and
    controlnet/ subfolders are converted into DST/<name>, tokenizer/ and scheduler/ copied;
  * a PASD training checkpoint folder (checkpoint-N/ with unet/ and controlnet/).

DST receives config.json + flax_params.safetensors per component. Nothing is written unless
everything converts; an existing DST is only replaced with --overwrite.

PyTorch .bin/.ckpt files are read without torch and without running code from the file; a
pickle that references anything besides tensors is refused.

LoRA files (--lora) are merged into the UNet and text encoder of any SD source.

other commands (each has --help):
  python -m convert base SRC --name NAME   store a converted base model under $PASD_JAX_HOME
  python -m convert list                   list stored base models
  python -m convert export SRC DST         write converted weights back as a PyTorch diffusers folder
  python -m convert stablesr SR_CKPT CFW_CKPT DST   convert a StableSR model (SR checkpoint + CFW autoencoder)

examples:
  python -m convert ~/sd15/unet converted/unet
  python -m convert ~/stable-diffusion-v1-5 converted/sd15
  python -m convert runs/pasd/checkpoint-100000 converted/pasd --overwrite
  python -m convert majicmixRealistic_v7.safetensors converted/majicmix --template ~/stable-diffusion-v1-5
  python -m convert v1-5-pruned-emaonly.ckpt converted/sd15 --lora add_detail.safetensors:0.5
"""

# name -> main(argv) -> exit code.
SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "base": commands.run_base,
    "list": commands.run_list,
    "export": commands.run_export,
    "stablesr": lambda argv: _run_stablesr(argv),
}


def _run_stablesr(argv: Sequence[str]) -> int:
    from convert import stablesr  # imported on demand: it builds the StableSR modules

    return stablesr.run(argv)

# Errors with a message meant for the user; anything else is reported with its type.
EXPECTED_ERRORS = (ConversionError, torch_io.CheckpointReadError, FileNotFoundError, FileExistsError,
                   ValueError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert PyTorch diffusers/transformers weights (Stable Diffusion, PASD) into "
                    "Flax folders for pasd_jax.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", metavar="SRC",
                        help="component, pipeline or PASD checkpoint folder (PyTorch), or a single-file checkpoint")
    parser.add_argument("dst", metavar="DST", help="output folder (must not exist, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DST if it is a folder written by this converter")
    parser.add_argument("--variant", metavar="NAME", default=None,
                        help='read weights of a diffusers variant, e.g. "fp16" '
                             "(diffusion_pytorch_model.fp16.safetensors)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    commands.add_source_options(parser)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def run_convert(argv: Sequence[str]) -> int:
    """The default command: convert SRC into DST."""
    args = build_parser().parse_args(argv)
    if os.path.isfile(args.src) or args.lora or args.prediction_type or args.template or args.extract_ema:
        return commands.run_single(args)
    start = time.perf_counter()
    src = os.fspath(args.src)
    progress, done = None, []

    def on_component(name: str) -> None:
        nonlocal progress
        if args.quiet:
            return
        if progress is None:  # created only once the source is known to be convertible
            from tqdm import tqdm

            total = 1 if core.is_component_folder(src) else len(core.component_subfolders(src))
            progress = tqdm(desc="converting", total=total, unit="component", file=sys.stderr, leave=False)
        progress.update(len(done) and 1)  # the previous component is finished
        progress.set_postfix_str(name)
        done.append(name)

    try:
        if not args.quiet and not core.is_component_folder(src) and os.path.isdir(src):
            skipped = core.skipped_subfolders(src)
            if skipped:
                print(f"not converted (not used by pasd_jax): {', '.join(skipped)}", file=sys.stderr)
        reports = core.convert_folder(src, args.dst, overwrite=args.overwrite, variant=args.variant,
                                      on_component=on_component)
    finally:
        if progress is not None:
            progress.close()
    if not args.quiet:
        for report in reports:
            print(report.describe())
        total = sum(r.num_params for r in reports)
        print(f"converted {len(reports)} component{'s' * (len(reports) != 1)} "
              f"({', '.join(f'{r.name} {core.format_count(r.num_params)}' for r in reports)}; "
              f"{core.format_count(total)} parameters) into {args.dst} in {time.perf_counter() - start:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 error, 2 usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = SUBCOMMANDS.get(argv[0], run_convert) if argv else run_convert
    if command is not run_convert:
        argv = argv[1:]
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return command(argv)
        except SystemExit as exit_:  # argparse: --help (0) and usage errors (2)
            return exit_.code if isinstance(exit_.code, int) else 2
        except KeyboardInterrupt:
            print("error: interrupted; nothing was written", file=sys.stderr)
            return 130
        except EXPECTED_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        except Exception:  # a bug: keep the traceback for the report (writes are atomic: no partial output)
            traceback.print_exc()
            print("error: unexpected failure (a bug in the converter; the traceback is above); "
                  "nothing was written", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
