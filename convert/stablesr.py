"""Convert a StableSR model (SR checkpoint + CFW autoencoder) into a converted pasd_jax folder.

    python -m convert stablesr SR_CKPT CFW_CKPT DST [--config SR.yaml] [--cfw-config CFW.yaml] [--overwrite]

Both files go through the converter's torch-free readers (`.ckpt` / `.pt` weights-only unpickler,
`.safetensors` header index). Layout detection refuses a file of the wrong kind with one line
saying what it found; the mapping is strict (`convert.stablesr_layout`): every unexpected, missing
or mis-shaped key is listed, and the keys dropped by name are counted in the report. The result:

    DST/pasd_jax.json, DST/{unet,struct_encoder,first_stage,cfw}/, DST/empty_context.safetensors
    (the layout of `pasd_jax.assembly.stablesr`; the context only when the SR file carries the
    OpenCLIP text tower)

The scripts only ever encode the empty prompt (STABLESR_REFERENCE §8.1 step 4), so the text
tower runs once here (tokens `[SOT, EOT, 0, …]`, penultimate layer + ln_final) and is not stored.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml

from convert import ldm, single_file
from convert.mapping import ConversionError, torch_to_flax
from convert.stablesr_layout import StableSRLayoutError, cfw_config, plan_cfw, plan_sr, require, sr_configs
from pasd_jax.assembly import weights
from pasd_jax.assembly.stablesr import COMPONENTS, abstract_params, build_module, write_folder
from pasd_jax.models import clip_text
#: OpenCLIP token ids of the empty prompt: SOT, EOT, then open_clip's 0 padding.
SOT, EOT = 49406, 49407


def read_yaml_model(path: str | None) -> dict | None:
    """The `model` node of an LDM yaml config, or None when no path is given."""
    if path is None:
        return None
    try:
        with open(path) as f:
            node = yaml.safe_load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(node, dict) or not isinstance(node.get("model"), dict):
        raise ValueError(f"{path}: no `model:` section (expected an LDM/StableSR yaml config)")
    return node["model"]


def _materialize(plan: Mapping[str, tuple], tensors: Mapping[str, Any]) -> dict:
    out = {}
    for new, (src, transform) in plan.items():
        array = np.asarray(tensors[src])
        out[new] = transform(array) if transform is not None else array
    return out


def _convert(component: str, config: dict, plan: Mapping, tensors: Mapping, what: str, problems: list) -> dict:
    module = build_module(component, config)
    try:
        return torch_to_flax(_materialize(plan, tensors), abstract_params(module), what=f"{what} ({component})")
    except ConversionError as err:
        problems.append(_with_file_names(str(err), plan))
        return {}


def _with_file_names(message: str, plan: Mapping[str, tuple]) -> str:
    """Name the file's own keys in a mapping error (the mapping saw our renamed keys)."""
    back = {new: src for new, (src, _) in plan.items() if new != src}
    lines = []
    for line in message.split("\n"):
        body = line.lstrip()
        key = body.split(":")[0].split(" ")[0]
        if key in back:
            line = line[:len(line) - len(body)] + back[key] + body[len(key):]
        lines.append(line)
    return "\n".join(lines)


def empty_context(state: Mapping[str, Any], text_keys: Sequence[str], what: str) -> np.ndarray:
    """Run the OpenCLIP text tower (penultimate layer, ln_final) on the empty prompt -> (1, L, D)."""
    config = single_file.infer_text_config(state, "sd2")
    plan, unmatched = ldm.plan_open_clip(text_keys, config["num_hidden_layers"])
    module = clip_text.from_config(config)
    try:
        params = torch_to_flax(_materialize(plan, state), abstract_params(module), what=f"{what} (text)")
    except ConversionError as err:
        raise ConversionError(f"{err}\n  unexpected text keys: {unmatched}" if unmatched else str(err)) from None
    ids = np.zeros((1, config["max_position_embeddings"]), np.int32)
    ids[0, :2] = (SOT, EOT)
    out = module.apply({"params": params}, jnp.asarray(ids))
    return np.asarray(out.last_hidden_state, np.float32)


def convert_models(sr_path: str, cfw_path: str, *, sr_yaml: str | None = None, cfw_yaml: str | None = None):
    """Read, check and map both files -> (configs, {component: params}, context or None, report lines).

    Raises `StableSRLayoutError` (wrong kind of file), `ConversionError` (strict mapping: every
    problem of every component listed), reader errors for damaged files.
    """
    sr = single_file.open_checkpoint(sr_path)
    require(sr.tensors, "stablesr", sr_path)
    cfw = single_file.open_checkpoint(cfw_path)
    require(cfw.tensors, "stablesr_cfw", cfw_path)
    configs = sr_configs(read_yaml_model(sr_yaml))
    configs["cfw"] = cfw_config(read_yaml_model(cfw_yaml))
    plans, dropped, unexpected, text_keys = plan_sr(sr.tensors, configs)
    cfw_plan, cfw_dropped, cfw_unexpected = plan_cfw(cfw.tensors, configs["cfw"])
    problems = []
    if unexpected or cfw_unexpected:
        listed = [f"    {sr_path}: {k}" for k in sorted(unexpected)] + [f"    {cfw_path}: {k}" for k in sorted(cfw_unexpected)]
        problems.append(f"keys that belong to no StableSR component ({len(listed)}):\n" + "\n".join(listed[:40]))
    params = {name: _convert(name, configs[name], plans[name], sr.tensors, sr_path, problems)
              for name in ("unet", "struct_encoder", "first_stage")}
    params["cfw"] = _convert("cfw", configs["cfw"], cfw_plan, cfw.tensors, cfw_path, problems)
    if problems:
        against = (f"the configs {sr_yaml} / {cfw_yaml or 'released CFW'}" if sr_yaml or cfw_yaml else
                   "the released StableSR-512 configuration (pass --config / --cfw-config for other models)")
        raise ConversionError(f"StableSR weights do not match {against}:\n" + "\n".join(problems))
    context = empty_context(sr.tensors, text_keys, sr_path) if text_keys else None
    lines = [f"{sr_path}: StableSR SR checkpoint; {cfw_path}: StableSR CFW autoencoder"]
    for name in COMPONENTS:
        n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params[name]))
        lines.append(f"  {name}: {n:,} parameters")
    for why, keys in {**dropped, **cfw_dropped}.items():
        lines.append(f"  dropped {len(keys)} keys: {why}")
    lines.append("  empty-prompt context: " + ("computed from the OpenCLIP text tower" if context is not None
                                             else "not available (no cond_stage_model.* keys)"))
    return configs, params, context, lines


EPILOG = """\
SR_CKPT is the StableSR diffusion checkpoint (stablesr_000117.ckpt / .safetensors: model.diffusion_model.*,
structcond_stage_model.*, first_stage_model.*, cond_stage_model.*); CFW_CKPT the CFW autoencoder
(vqgan_cfw_00011.ckpt; its training-only loss.* keys are dropped). Without --config / --cfw-config
the released configurations (v2-finetune_text_T_512.yaml, autoencoder_kl_64x64x4_resi.yaml) are assumed.
Only eps-prediction models are supported (not the 768v one).

example:
  python -m convert stablesr stablesr_000117.ckpt vqgan_cfw_00011.ckpt converted/stablesr
  python sample.py --ckpt converted/stablesr --input lr/ --output sr/
"""


def run(argv: Sequence[str]) -> int:
    """`python -m convert stablesr SR_CKPT CFW_CKPT DST`."""
    parser = argparse.ArgumentParser(prog="python -m convert stablesr", epilog=EPILOG,
                                     description="Convert a StableSR model (SR checkpoint + CFW autoencoder).",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sr_ckpt", metavar="SR_CKPT")
    parser.add_argument("cfw_ckpt", metavar="CFW_CKPT")
    parser.add_argument("dst", metavar="DST")
    parser.add_argument("--config", default=None, help="the SR model's yaml (default: released 512 config)")
    parser.add_argument("--cfw-config", default=None, help="the CFW autoencoder's yaml (default: released)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if this converter wrote it")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    weights.check_destination(args.dst, args.overwrite)
    configs, params, context, lines = convert_models(args.sr_ckpt, args.cfw_ckpt, sr_yaml=args.config,
                                                     cfw_yaml=args.cfw_config)
    write_folder(args.dst, configs, params, context, sampling=configs["sampling"], overwrite=args.overwrite,
                 extra={"sources": {"sr": os.path.abspath(args.sr_ckpt), "cfw": os.path.abspath(args.cfw_ckpt)}})
    if not args.quiet:
        for line in lines + [f"converted into {args.dst} in {time.perf_counter() - start:.1f} s"]:
            print(line)
    return 0


__all__ = ["COMPONENTS", "StableSRLayoutError", "convert_models", "run"]

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
