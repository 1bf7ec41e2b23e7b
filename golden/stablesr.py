"""StableSR golden harness: `python -m golden --stablesr GOLDEN_DIR OUT_DIR` (or `python -m pasd_jax.golden ...`).

Reads `GOLDEN_DIR/manifest.json` (layout of `shared/reference/stablesr_golden/README.md`): the
weights (original key names, converted here through `convert.stablesr.convert_models` with the
set's yaml configs), and the variants `unet_sft`, `cfw`, `colorfix`, `e2e_old`, `e2e_tile` with
their cases. Every case runs through our code and its `outputs` file is written under OUT_DIR
with the README's tensor names (NCHW float32, timesteps int64):

* unet_sft: `struct_cond.<width>`, `eps`;
* cfw: `encoder.moments`, `encoder.enc_fea.{i}`, `sr_first_stage.moments`, `decoded.w<w>` for the
  manifest's `fusion_ws`;
* colorfix: `adain`, `wavelet`;
* e2e_old / e2e_tile: the scripts' tensors (`pasd_jax.sampling.stablesr_pipeline`), with the saved
  `noise.NN.<caller>` tensors replacing the random draws in order and the saved `context`.

Nothing is specific to the dev set: configs, sizes, step counts, colour fixes and options come
from the manifest, the yaml files and each case's `options`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from convert.stablesr import convert_models
from pasd_jax.assembly.stablesr import StableSRBundle, bundle_from
from pasd_jax.imaging.color_fix import adaptive_instance_normalization, wavelet_reconstruction
from pasd_jax.sampling.stablesr_pipeline import StableSROptions, restore_old, restore_tile
from pasd_jax.sampling.stablesr_preprocess import load_img_old, read_image_tile


class StableSRGoldenError(RuntimeError):
    """The golden directory is incomplete or inconsistent."""


def nhwc(a) -> jnp.ndarray:
    return jnp.transpose(jnp.asarray(a), (0, 2, 3, 1))


def to_nchw(tensors: dict) -> dict:
    """NHWC arrays (4-D) -> NCHW, everything contiguous numpy (floats float32, ints int64)."""
    out = {}
    for name, value in tensors.items():
        a = np.asarray(value)
        if a.ndim == 4:
            a = np.transpose(a, (0, 3, 1, 2))
        a = a.astype(np.int64) if a.dtype.kind in "iu" else a.astype(np.float32)
        out[name] = np.ascontiguousarray(a)
    return out


class SavedNoise:
    """The goldens' `noise.NN.<caller>` tensors handed out in order (`reseed` does nothing)."""

    def __init__(self, inputs: dict, order: list[str] | None):
        names = order or sorted(k for k in inputs if k.startswith("noise."))
        self._queue = [(n, inputs[n]) for n in names]

    def reseed(self) -> None:
        pass

    def peek_batch(self) -> int:
        """Batch size of the next saved draw."""
        if not self._queue:
            raise StableSRGoldenError("the case has no saved noise tensors")
        return self._queue[0][1].shape[0]

    def draw(self, kind: str, shape) -> np.ndarray:
        if not self._queue:
            raise StableSRGoldenError(f"the case has no saved noise left for a {kind!r} draw")
        name, value = self._queue.pop(0)
        if not name.endswith("." + kind):
            raise StableSRGoldenError(f"draw {kind!r} got {name}: the random draws are out of order")
        value = np.transpose(value, (0, 2, 3, 1))
        if tuple(value.shape) != tuple(shape):
            raise StableSRGoldenError(f"{name}: saved shape {value.shape} (NHWC), the draw wants {tuple(shape)}")
        return value.astype(np.float32)

    def check_used(self) -> None:
        if self._queue:
            raise StableSRGoldenError(f"{len(self._queue)} saved noises were not drawn: {self._queue[0][0]} ...")


def load_models(golden_dir: str, manifest: dict, context=None) -> StableSRBundle:
    w = manifest["weights"]
    path = lambda key: os.path.join(golden_dir, w[key]) if w.get(key) else None
    configs, params, ctx, _ = convert_models(path("stablesr"), path("vqgan_cfw"), sr_yaml=path("stablesr_config"),
                                             cfw_yaml=path("vqgan_cfw_config"))
    sampling = dict(configs["sampling"])
    sampling["scale_factor"] = float(manifest.get("scale_factor", sampling["scale_factor"]))
    return bundle_from(configs, params, sampling, ctx if context is None else context, source=golden_dir)


def run_unet_sft(models: StableSRBundle, inputs: dict, case: dict) -> dict:
    t = jnp.asarray(inputs["timesteps"]).astype(jnp.int32)
    feats = models.struct_encoder.apply({"params": models.params["struct_encoder"]}, nhwc(inputs["struct_cond"]), t)
    eps = models.unet.apply({"params": models.params["unet"]}, nhwc(inputs["x_noisy"]), t,
                            jnp.asarray(inputs["context"]), feats)
    return {**{f"struct_cond.{k}": v for k, v in feats.items()}, "eps": eps}


def run_cfw(models: StableSRBundle, inputs: dict, variant: dict) -> dict:
    cfw, p = models.cfw, models.params["cfw"]
    lq = nhwc(inputs["lq_image"])
    moments, feats = cfw.apply({"params": p}, lq, method="encode")
    out = {"encoder.moments": moments, **{f"encoder.enc_fea.{i}": f for i, f in enumerate(feats)}}
    out["sr_first_stage.moments"] = models.first_stage.apply({"params": models.params["first_stage"]}, lq)
    given = [nhwc(inputs[f"enc_fea.{i}"]) for i in range(len(feats))]
    for w in variant.get("fusion_ws", (0.0, 0.5, 1.0)):
        out[f"decoded.w{float(w):.1f}"] = cfw.apply({"params": p}, nhwc(inputs["z"]), given, float(w), method="decode")
    return out


def run_colorfix(inputs: dict) -> dict:
    c, s = nhwc(inputs["content"]), nhwc(inputs["style"])
    return {"adain": adaptive_instance_normalization(c, s), "wavelet": wavelet_reconstruction(c, s)}


def options_of(case: dict) -> tuple[StableSROptions, int]:
    """(StableSROptions, n_samples) from a case's script `options` (`--ddpm_steps 4` ...); others keep defaults."""
    opts = {k.lstrip("-"): v for k, v in (case.get("options") or {}).items()}
    kw = {}
    for name, cast in (("ddpm_steps", int), ("dec_w", float), ("colorfix_type", str), ("upscale", float),
                       ("input_size", int), ("tile_overlap", int), ("vqgantile_size", int),
                       ("vqgantile_stride", int)):
        if name in opts:
            kw[name] = cast(opts[name])
    if "n_samples" in opts:
        kw["tiles_per_call"] = int(opts["n_samples"])
    return StableSROptions(**kw), int(opts.get("n_samples", 1))


def lr_images(inputs: dict, case: dict) -> list[np.ndarray]:
    """The case's LR PNGs (uint8 HWC) in `batch_order`."""
    n = len(case.get("batch_order") or case.get("lr_images") or [0])
    return [inputs[f"lq_uint8_hwc.{i}"] for i in range(n)]


def run_e2e_old(models: StableSRBundle, inputs: dict, case: dict) -> dict:
    options, _ = options_of(case)
    images = np.stack([load_img_old(im, options.input_size) for im in lr_images(inputs, case)])
    noise, parts = SavedNoise(inputs, case.get("randn_order")), []
    # The script batches --n_samples images (default 2); the first saved draw (the batch's posterior
    # sample) has exactly that batch size, so take it from there.
    n_samples = int(noise.peek_batch())
    for start in range(0, len(images), max(n_samples, 1)):
        parts.append(restore_old(models, images[start:start + n_samples], options, noise))
    noise.check_used()
    out = {}
    for name in parts[0]:
        out[name] = parts[0][name] if name.startswith("schedule.") else np.concatenate([p[name] for p in parts])
    return out


def run_e2e_tile(models: StableSRBundle, inputs: dict, case: dict) -> dict:
    options, _ = options_of(case)
    images = lr_images(inputs, case)
    if len(images) != 1:
        raise StableSRGoldenError("e2e_tile cases hold one LR image (the script runs one image per call)")
    noise = SavedNoise(inputs, case.get("randn_order"))
    out = restore_tile(models, read_image_tile(images[0])[None], options, noise)
    noise.check_used()
    return out


def run_stablesr_golden(golden_dir: str, out_dir: str, log=print) -> list[str]:
    manifest_path = os.path.join(golden_dir, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise StableSRGoldenError(f"no manifest.json in {golden_dir}")
    with open(manifest_path) as f:
        manifest = json.load(f)
    t0 = time.perf_counter()
    models = load_models(golden_dir, manifest)
    log(f"converted {manifest['weights'].get('stablesr')} + {manifest['weights'].get('vqgan_cfw')} "
        f"in {time.perf_counter() - t0:.1f}s")
    written = []
    for vname, variant in manifest.get("variants", {}).items():
        for cname, case in variant.get("cases", {}).items():
            t0 = time.perf_counter()
            inputs = load_file(os.path.join(golden_dir, case["inputs"]))
            if "context" in inputs:
                models.context = inputs["context"]
            if vname == "unet_sft":  # jitted: compiling beats op-by-op dispatch on a CPU
                out = jax.jit(lambda i: run_unet_sft(models, i, case))(inputs)
            elif vname == "cfw":
                out = jax.jit(lambda i: run_cfw(models, i, variant))(inputs)
            elif vname == "colorfix":
                out = run_colorfix(inputs)
            elif vname == "e2e_old" or case.get("script", "").endswith("_old.py"):
                out = run_e2e_old(models, inputs, case)
            elif vname == "e2e_tile" or case.get("script", "").endswith("_tile.py"):
                out = run_e2e_tile(models, inputs, case)
            else:
                raise StableSRGoldenError(f"unknown variant {vname!r}")
            path = os.path.join(out_dir, case["outputs"])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_file(to_nchw(out), path)
            written.append(path)
            log(f"[{vname}] {cname}: {len(out)} tensors -> {path} ({time.perf_counter() - t0:.1f}s)")
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m golden --stablesr", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("golden_dir")
    ap.add_argument("out_dir")
    args = ap.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")
    from convert.mapping import ConversionError
    from convert.stablesr_layout import StableSRLayoutError
    try:
        written = run_stablesr_golden(args.golden_dir, args.out_dir)
    except (StableSRGoldenError, ConversionError, StableSRLayoutError, FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} output files under {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
