"""`python -m convert` subcommands for the SD ecosystem: single files, LoRA, bases, export.

    python -m convert FILE.safetensors DST [--template DIR] [--lora L.safetensors:0.8 ...]
    python -m convert base SRC --name NAME [same options]       # store under the models home
    python -m convert list                                      # stored bases
    python -m convert export SRC DST [--base NAME]              # back to PyTorch diffusers

`build_converted` is the shared engine: a single file (`convert.single_file`) or a diffusers /
PASD folder (`convert.core`) converted into a staging folder, LoRAs merged, the scheduler's
prediction type set, then renamed into place, so a failure leaves nothing at DST (nor in the
models home).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence

from convert import core, export, lora, single_file
from pasd_jax.assembly import home, registry, weights

SOURCE_HELP = """\
Single files: an SD1.x / SD2.x checkpoint in the original (A1111 / civitai) layout,
.safetensors, .ckpt or .pt, fp32/fp16/bf16, pruned or with EMA copies. SDXL, inpainting and
other model types are refused. .ckpt/.pt are read without running code from the file.
A single file has no tokenizer: it comes from --template, else from a stored base of the
same SD version."""


def add_source_options(parser: argparse.ArgumentParser) -> None:
    """Options for single-file sources and LoRA merges (the default command and `base`)."""
    group = parser.add_argument_group("single-file checkpoints and LoRA")
    group.add_argument("--template", metavar="DIR", default=None,
                       help="diffusers (or converted) SD pipeline folder whose component configs, tokenizer/ "
                            "and scheduler/ a single file uses, like diffusers' from_single_file(config=...); "
                            "without it configs are inferred from the weights")
    group.add_argument("--prediction-type", choices=single_file.PREDICTION_TYPES, default=None,
                       help="override the detected prediction type (SD2-768 and 'v_pred' files: v_prediction)")
    group.add_argument("--extract-ema", action="store_true",
                       help="use the file's EMA UNet weights (model_ema.*) instead of the regular ones")
    group.add_argument("--lora", metavar="FILE[:MULT]", action="append", default=[],
                       help="merge a LoRA (kohya/A1111, diffusers/PEFT, LoCon) with multiplier MULT "
                            "(default 1); repeat for several: W += MULT * alpha/rank * up @ down")
    group.add_argument("--lora-allow-unmatched", action="store_true",
                       help="list and skip LoRA modules that match no layer (default: error)")


@dataclasses.dataclass
class BuildResult:
    lines: list[str]
    model_type: str | None
    prediction_type: str | None


def _model_type_of(folder: str) -> str | None:
    """"sd1"/"sd2" from a converted pipeline's text encoder width (None when absent)."""
    path = os.path.join(folder, "text_encoder", weights.CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return {768: "sd1", 1024: "sd2"}.get(json.load(f).get("hidden_size"))


def _progress_factory(quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm

    return lambda name, total: tqdm(desc=f"converting {name}", total=total, unit="tensor", file=sys.stderr,
                                    leave=False)


def _update_manifest(folder: str, **fields) -> None:
    """Add `fields` to a converted pipeline's `pasd_jax.json` (a lone component folder has none)."""
    if os.path.isfile(os.path.join(folder, weights.CONFIG_NAME)):
        return
    path = os.path.join(folder, weights.MANIFEST_NAME)
    manifest = {}
    if os.path.isfile(path):
        with open(path) as f:
            manifest = json.load(f)
    manifest.update(fields)
    with open(path, "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")


def _merge_loras_into_folder(folder: str, loras: lora.LoraSet) -> None:
    """Merge LoRAs into the unet/ and text_encoder/ of a converted folder (in place; staged)."""
    parts = [folder] if os.path.isfile(os.path.join(folder, weights.CONFIG_NAME)) else \
        [os.path.join(folder, n) for n in ("unet", "text_encoder") if os.path.isdir(os.path.join(folder, n))]
    for part in parts:
        config, params = weights.load_converted(part)
        component = registry.detect_component(config)
        if component not in ("unet", "text_encoder"):
            continue
        merged = loras.merge(component, params, config if component == "unet" else None)
        if merged is not params:
            weights.save_converted(part, config, merged, component=component, overwrite=True)


def _lora_hook(loras: lora.LoraSet):
    """`convert_single_file`'s `edit_params`: merge LoRAs into the UNet and the text encoder."""
    def edit(component: str, params: dict, config: dict) -> dict:
        if component not in ("unet", "text_encoder"):
            return params
        return loras.merge(component, params, config if component == "unet" else None)
    return edit


def _check_loras(loras: lora.LoraSet, allow_unmatched: bool) -> list[str]:
    unmatched = loras.unmatched()
    if unmatched and not allow_unmatched:
        raise lora.LoraError(f"{len(unmatched)} LoRA modules match no layer of the model (wrong SD version, or "
                             f"an unsupported layer type); pass --lora-allow-unmatched to skip them:\n    "
                             + "\n    ".join(unmatched[:30]) + (f"\n    ... and {len(unmatched) - 30} more"
                                                              if len(unmatched) > 30 else ""))
    return [f"skipped {len(unmatched)} unmatched LoRA modules: {', '.join(unmatched[:10])}"
            f"{' ...' if len(unmatched) > 10 else ''}"] if unmatched else []


def build_converted(src: str, dst: str, args: argparse.Namespace, *, overwrite: bool,
                    base_name: str | None = None, variant: str | None = None) -> BuildResult:
    """Convert `src` (single file or folder) into `dst` with the options of `add_source_options`.

    With `base_name`, the result must be a complete base (unet/, vae/, text_encoder/, tokenizer/),
    checked before anything is renamed into place.
    """
    require_tokenizer = base_name is not None
    src, dst = os.fspath(src), os.fspath(dst)
    specs = [lora.parse_lora_arg(s) for s in args.lora]
    loras = lora.LoraSet.load(specs)  # read (and validate) every LoRA before converting anything
    weights.check_destination(dst, overwrite)
    staged = weights.staging_dir(dst)
    out = os.path.join(staged, "out")
    lines: list[str] = []
    try:
        if os.path.isfile(src):
            report = single_file.convert_single_file(
                src, out, template=args.template, prediction_type=args.prediction_type,
                extract_ema=args.extract_ema, progress=_progress_factory(getattr(args, "quiet", False)),
                edit_params=_lora_hook(loras) if loras else None, require_tokenizer=require_tokenizer)
            lines.append(report.describe())
            model_type, prediction = report.model_type, report.prediction_type
            if report.tokenizer is None:
                lines.append(f"note: {single_file.NO_TOKENIZER}")
        elif os.path.isdir(src):
            for flag, value in (("--template", args.template), ("--extract-ema", args.extract_ema)):
                if value:
                    raise ValueError(f"{flag} applies to single-file checkpoints; {src} is a folder")
            if os.path.isfile(os.path.join(src, weights.MANIFEST_NAME)):  # already converted: copy
                shutil.copytree(src, out, symlinks=True)
                lines.append(f"copied converted folder {src}")
            else:
                reports = core.convert_folder(src, out, variant=variant)
                lines.extend(r.describe() for r in reports)
            if loras:
                _merge_loras_into_folder(out, loras)
            model_type = _model_type_of(out)
            prediction = _set_prediction(out, args.prediction_type)
            if require_tokenizer and not os.path.isdir(os.path.join(out, "tokenizer")):
                raise FileNotFoundError(f"{src} has no tokenizer/ folder; a base needs one")
        else:
            raise FileNotFoundError(f"{src} does not exist")
        if loras:
            lines.extend(_check_loras(loras, args.lora_allow_unmatched))
            lines.append(f"merged LoRA: {loras.describe()}")
            _update_manifest(out, loras=[{"path": os.path.abspath(f.path), "multiplier": f.multiplier}
                                         for f in loras.files])
        _update_manifest(out, model_type=model_type, prediction_type=prediction)
        if base_name is not None:
            missing = home.missing_base_parts(out)
            if missing:
                raise ValueError(f"{src} is not a complete SD model: no {', '.join(missing)} after conversion "
                                 f"(a base needs unet, vae, text_encoder and tokenizer)")
            _update_manifest(out, base_name=base_name)
        weights.commit_dir(out, dst, overwrite=overwrite)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return BuildResult(lines, model_type, prediction)


def _set_prediction(folder: str, override: str | None) -> str | None:
    """Apply `--prediction-type` to a converted folder's scheduler config; return the type in use."""
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        if override:
            raise FileNotFoundError(f"--prediction-type: {folder} has no scheduler/scheduler_config.json")
        return None
    with open(path) as f:
        config = json.load(f)
    if override:
        config["prediction_type"] = override
        with open(path, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    return config.get("prediction_type", "epsilon")


# ---- subcommands ---------------------------------------------------------------------------
def _print_lines(lines: Sequence[str], quiet: bool) -> None:
    if not quiet:
        for line in lines:
            print(line)


def run_single(args: argparse.Namespace) -> int:
    """The default command for a single-file SRC, or a folder SRC with --lora/--prediction-type."""
    start = time.perf_counter()
    result = build_converted(args.src, args.dst, args, overwrite=args.overwrite, variant=args.variant)
    _print_lines(result.lines + [f"converted {args.src} into {args.dst} in {time.perf_counter() - start:.1f} s"],
                 args.quiet)
    return 0


BASE_EPILOG = f"""\
SRC is a single-file checkpoint or a diffusers SD pipeline folder (or a converted one).
The base is stored under $PASD_JAX_HOME/bases/NAME (default ~/.cache/pasd_jax); sampling with
--base NAME then takes the UNet's stock weights, the VAE and the text encoder from it and keeps
the PASD ControlNet and pixel-aware (PACA) weights.

{SOURCE_HELP}

examples:
  python -m convert base majicmixRealistic_v7.safetensors --name majicmix --template ~/stable-diffusion-v1-5
  python -m convert base toonyou_beta6.safetensors --name toonyou --lora detail.safetensors:0.6
  python -m convert base ~/stable-diffusion-v1-5 --name sd15
"""


def run_base(argv: Sequence[str]) -> int:
    """`base SRC --name NAME`: convert SRC and store it as a named base in the models home."""
    parser = argparse.ArgumentParser(prog="python -m convert base",
                                     description="Convert an SD1.x/SD2.x model and store it as a named base model.",
                                     epilog=BASE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", metavar="SRC", help="single-file checkpoint or SD pipeline folder")
    parser.add_argument("--name", required=True, help="name to store the base under (letters, digits, . _ + -)")
    parser.add_argument("--overwrite", action="store_true", help="replace a stored base of the same name")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    add_source_options(parser)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    home.check_base_name(args.name)
    dst = os.fspath(home.bases_dir() / args.name)
    if os.path.lexists(dst) and not args.overwrite:
        raise FileExistsError(f"a base named {args.name!r} already exists ({dst}); pass --overwrite to replace it")
    result = build_converted(args.src, dst, args, overwrite=args.overwrite, base_name=args.name)
    _print_lines(result.lines + [f"stored base {args.name!r} ({result.model_type or 'SD'}, "
                                 f"{result.prediction_type or 'epsilon'}) in {dst} "
                                 f"({time.perf_counter() - start:.1f} s); use it with --base {args.name}"],
                 args.quiet)
    return 0


def run_list(argv: Sequence[str]) -> int:
    """`list`: the stored bases, one per line."""
    parser = argparse.ArgumentParser(prog="python -m convert list",
                                     description="List the base models stored under the models home "
                                                 "($PASD_JAX_HOME, default ~/.cache/pasd_jax).")
    parser.parse_args(argv)
    names = home.list_bases()
    print(f"models home: {home.models_home()}")
    if not names:
        print("no bases stored; add one with `python -m convert base SRC --name NAME`")
        return 0
    for name in names:
        try:
            with open(home.bases_dir() / name / weights.MANIFEST_NAME) as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            manifest = {}
        loras = manifest.get("loras") or []
        extra = f", {len(loras)} LoRA merged" if loras else ""
        print(f"{name}\t{(manifest.get('model_type') or '?').upper()}\t{manifest.get('prediction_type') or '?'}"
              f"{extra}\t{manifest.get('source', '?')}")
    return 0


EXPORT_EPILOG = """\
SRC: a converted component folder, a converted pipeline (e.g. a stored base: $PASD_JAX_HOME/bases/NAME),
or a converted / trained PASD folder (unet/, controlnet/). DST receives what diffusers'
save_pretrained writes: <component>/config.json + diffusion_pytorch_model.safetensors
(text_encoder/model.safetensors), tokenizer/, scheduler/, model_index.json.

examples:
  python -m convert export converted/pasd exported/pasd
  python -m convert export converted/pasd exported/pasd_majicmix --base majicmix
  python -m convert export ~/.cache/pasd_jax/bases/toonyou exported/toonyou
"""


def run_export(argv: Sequence[str]) -> int:
    """`export SRC DST [--base NAME]`: converted Flax folder -> PyTorch diffusers folder."""
    parser = argparse.ArgumentParser(prog="python -m convert export",
                                     description="Write converted or trained pasd_jax weights back as a PyTorch "
                                                 "diffusers folder.",
                                     epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", metavar="SRC", help="converted component or pipeline folder")
    parser.add_argument("dst", metavar="DST", help="output folder (must not exist, unless --overwrite)")
    parser.add_argument("--base", metavar="NAME_OR_DIR", default=None,
                        help="swap in a stored base: stock UNet weights, VAE and text encoder from it")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it was written by export")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    names = export.export_folder(args.src, args.dst, base=args.base, overwrite=args.overwrite)
    _print_lines([f"exported {', '.join(names)} to {args.dst} (PyTorch diffusers layout) in "
                  f"{time.perf_counter() - start:.1f} s"], args.quiet)
    return 0
