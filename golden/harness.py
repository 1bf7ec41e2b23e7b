"""Golden-vector harness: run the PASD ControlNet + UNet on a golden set and write their outputs.

    python -m pasd_jax.golden GOLDEN_DIR OUT_DIR [--variants pasd,pasd_rrdb] [--cases case1]
    python -m pasd_jax.golden --e2e E2E_DIR OUT_DIR      (end-to-end sampling; see golden/e2e.py)
    python -m pasd_jax.golden --stablesr GOLDEN_DIR OUT_DIR   (StableSR; see golden/stablesr.py)

(`python -m golden …` is the same command; this module is `golden.harness`.)

`GOLDEN_DIR/manifest.json` lists variants (each with `unet_dir`, `controlnet_dir` holding diffusers
`config.json` + `diffusion_pytorch_model.safetensors` or `.bin`) and cases (inputs file, NCHW).
For every case this runs, as the reference oracle did (shared/reference/golden/README.md),

    rgbs, down_res, mid_res = controlnet(sample, t, text, cond, conditioning_scale)
    unet_sample = unet(sample, t, text, down_res, mid_res)

and writes `OUT_DIR/<variant>/<case>_outputs.safetensors` (or the manifest's `outputs` path) with
`controlnet.rgbs.{i}`, `controlnet.down_res.{ii}`, `controlnet.mid_res`, `unet.sample`: float32,
NCHW. The UNet family (pasd / pasd_light) is detected from the checkpoint keys. Score the result
with `shared/reference/compare.py GOLDEN_DIR OUT_DIR`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Callable, Mapping, Optional

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from convert.core import read_config
from convert.mapping import ConversionError, torch_to_flax
from convert.torch_io import load_component_weights
from golden import e2e
from pasd_jax.assembly import registry
from pasd_jax.models import controlnet as controlnet_lib
from pasd_jax.models import unet as unet_lib
from pasd_jax.models.configs import UnsupportedConfigError

class GoldenError(RuntimeError):
    """The golden directory is incomplete or inconsistent (message says what is wrong)."""


# ---- loading ------------------------------------------------------------------------------
def _load_component(folder: str) -> tuple[dict, dict]:
    """diffusers component folder -> (config dict, state dict as numpy arrays), read by the
    converter's torch-free reader (safetensors or a weights-only `.bin`)."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise GoldenError(f"missing {os.path.join(folder, 'config.json')}")
    try:
        return read_config(folder), load_component_weights(folder)
    except FileNotFoundError as err:
        raise GoldenError(str(err)) from None


def detect_unet_family(keys) -> str:
    """`registry.detect_unet_family`, refusing a stock UNet (it cannot drive PASD)."""
    keys = list(keys)
    family = registry.detect_unet_family(keys)
    if family == "stock":
        sample = ", ".join(sorted(keys)[:8])
        raise GoldenError(f"UNet checkpoint has neither `pixel_attentions` (pasd) nor `attn2_plus`/`proj_in_plus` "
                          f"(pasd_light) keys; {len(keys)} keys, e.g. {sample}")
    return family


def load_unet(folder: str, expected_family: Optional[str] = None):
    """-> (UNet module, params). Family from the keys; `expected_family` (manifest) is a cross-check."""
    config, state = _load_component(folder)
    family = detect_unet_family(state)
    if expected_family and expected_family != family:
        print(f"  warning: manifest says family {expected_family!r}, the {folder} keys say {family!r}; "
              f"using {family!r}", file=sys.stderr)
    module = unet_lib.from_config(config, family=family)
    params = torch_to_flax(state, registry.abstract_params(module), what=folder)
    return module, jax.device_put(params)


def load_controlnet(folder: str):
    """-> (ControlNet module, params)."""
    config, state = _load_component(folder)
    module = controlnet_lib.from_config(config)
    params = torch_to_flax(state, registry.abstract_params(module), what=folder)
    return module, jax.device_put(params)


# ---- running ------------------------------------------------------------------------------
def make_forward(controlnet, unet) -> Callable:
    """jit-compiled `(cn_params, unet_params, sample, t, text, cond, scale) -> outputs dict (NHWC)`."""

    def forward(cn_params, unet_params, sample, timestep, text, cond, scale):
        rgbs, down_res, mid_res = controlnet.apply({"params": cn_params}, sample, timestep, text, cond,
                                                   conditioning_scale=scale)
        out = unet.apply({"params": unet_params}, sample, timestep, text,
                         down_block_additional_residuals=down_res, mid_block_additional_residual=mid_res)
        result = {f"controlnet.rgbs.{i}": r for i, r in enumerate(rgbs or [])}
        result.update({f"controlnet.down_res.{i:02d}": r for i, r in enumerate(down_res)})
        result["controlnet.mid_res"] = mid_res
        result["unet.sample"] = out
        return result

    return jax.jit(forward)


def _nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


def _nchw(x) -> np.ndarray:
    return np.ascontiguousarray(np.transpose(np.asarray(x, np.float32), (0, 3, 1, 2)))


def read_case_inputs(path: str, case: Mapping) -> dict:
    """inputs safetensors (NCHW torch layout) -> NHWC arrays + float32 scalar scale."""
    if not os.path.isfile(path):
        raise GoldenError(f"missing inputs file {path}")
    raw = load_file(path)
    missing = [k for k in ("sample", "timestep", "encoder_hidden_states", "controlnet_cond") if k not in raw]
    if missing:
        raise GoldenError(f"{path} lacks {missing}")
    if "conditioning_scale" in raw:
        scale = np.float32(np.asarray(raw["conditioning_scale"]).reshape(()))
    else:
        scale = np.float32(case.get("conditioning_scale", 1.0))
    timestep = np.asarray(raw["timestep"]).reshape(-1)
    if timestep.dtype.kind in "iu":
        timestep = timestep.astype(np.int32)  # jax runs without x64; SD timesteps are < 2^31
    return dict(sample=_nhwc(raw["sample"].astype(np.float32)), timestep=timestep,
                text=raw["encoder_hidden_states"].astype(np.float32),
                cond=_nhwc(raw["controlnet_cond"].astype(np.float32)), scale=scale)


def run_case(forward: Callable, cn_params, unet_params, inputs: Mapping) -> dict:
    """One golden case -> {golden tensor name: float32 NCHW (or [B, ...]) numpy array}."""
    out = forward(cn_params, unet_params, inputs["sample"], inputs["timestep"], inputs["text"],
                  inputs["cond"], inputs["scale"])
    return {k: _nchw(v) for k, v in out.items()}


def run_golden(golden_dir: str, out_dir: str, *, variants: Optional[list] = None,
               cases: Optional[list] = None, log=print) -> list[str]:
    """Run every (selected) variant × case of `golden_dir`; returns the written files."""
    jax.config.update("jax_default_matmul_precision", "highest")
    man_path = os.path.join(golden_dir, "manifest.json")
    if not os.path.isfile(man_path):
        raise GoldenError(f"no manifest.json in {golden_dir}")
    with open(man_path) as f:
        manifest = json.load(f)
    all_variants = manifest.get("variants") or {}
    if not all_variants:
        raise GoldenError(f"{man_path} lists no variants")
    unknown = sorted(set(variants or []) - set(all_variants))
    if unknown:
        raise GoldenError(f"variants {unknown} not in {man_path} (has {sorted(all_variants)})")

    written, unet_cache = [], {}
    for vname, variant in all_variants.items():
        if variants and vname not in variants:
            continue
        for field in ("unet_dir", "controlnet_dir"):
            if field not in variant:
                raise GoldenError(f"variant {vname!r} in {man_path} has no {field!r}")
        t0 = time.perf_counter()
        unet_dir = os.path.join(golden_dir, variant["unet_dir"])
        if unet_dir not in unet_cache:  # pasd_rrdb reuses pasd/unet
            unet_cache[unet_dir] = load_unet(unet_dir, variant.get("family"))
        unet, unet_params = unet_cache[unet_dir]
        controlnet, cn_params = load_controlnet(os.path.join(golden_dir, variant["controlnet_dir"]))
        log(f"[{vname}] unet={variant['unet_dir']} (family {unet.family}), "
            f"controlnet={variant['controlnet_dir']} (use_rrdb={controlnet.use_rrdb}) "
            f"loaded in {time.perf_counter() - t0:.1f}s")
        forward = make_forward(controlnet, unet)
        for cname, case in (variant.get("cases") or {}).items():
            if cases and cname not in cases:
                continue
            t0 = time.perf_counter()
            inputs = read_case_inputs(os.path.join(golden_dir, case.get("inputs", f"inputs/{cname}.safetensors")),
                                      case)
            outputs = run_case(forward, cn_params, unet_params, inputs)
            rel = case.get("outputs") or f"{vname}/{cname}_outputs.safetensors"
            path = os.path.join(out_dir, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_file(outputs, path)
            written.append(path)
            log(f"[{vname}] {cname}: sample {tuple(inputs['sample'].shape)} (NHWC), "
                f"scale {float(inputs['scale']):g}, {len(outputs)} tensors -> {path} "
                f"({time.perf_counter() - t0:.1f}s)")
    if not written:
        raise GoldenError("nothing was run (check --variants / --cases against the manifest)")
    return written


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--stablesr"]:  # the StableSR golden contract (golden/stablesr.py)
        from golden import stablesr

        return stablesr.main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m pasd_jax.golden", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("golden_dir", help="golden root (manifest.json), or with --e2e the e2e folder or its root")
    ap.add_argument("out_dir")
    ap.add_argument("--e2e", action="store_true",
                    help="run the end-to-end sampling contract instead (writes OUT_DIR/outputs.safetensors)")
    ap.add_argument("--variants", default=None, help="comma-separated subset of the manifest's variants")
    ap.add_argument("--cases", default=None, help="comma-separated subset of case names")
    args = ap.parse_args(argv)
    split = lambda s: [x for x in s.split(",") if x] if s else None
    if args.e2e:
        try:
            path = e2e.run_e2e(args.golden_dir, args.out_dir)
        except (e2e.E2EError, ConversionError, UnsupportedConfigError, FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {path}")
        return 0
    try:
        written = run_golden(args.golden_dir, args.out_dir, variants=split(args.variants), cases=split(args.cases))
    except (GoldenError, ConversionError, UnsupportedConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} output files under {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
