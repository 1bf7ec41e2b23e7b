"""bf16 vs fp32 compute: how far a bfloat16 UNet + ControlNet moves the e2e golden and the demo image.

    python benchmarks/bf16_parity.py                      # e2e golden case (3 steps) + smoke demo (20 steps)
    python benchmarks/bf16_parity.py --e2e-steps 20       # the golden nets over the recipe's 20 steps
    python benchmarks/bf16_parity.py --e2e DIR --golden DIR/outputs.safetensors   # an existing e2e folder
    python benchmarks/bf16_parity.py --no-e2e             # demo only (no torch needed)

Part 1 is the end-to-end golden case that `tests/sampling/e2e_test.py` scores. It uses the PASD
UNet and the RRDB ControlNet of the golden fixtures (`tests/fixtures/golden`), a seeded diffusers VAE
and transformers CLIP, SD1.5 DDIM, a 128² LQ image and every noise supplied. The golden tensors are
that test's PyTorch procedure (torch VAE, CLIP and `DDIMScheduler`; the noise prediction from our
float32 nets, which the PASD goldens prove). `golden.e2e.run_e2e`, the code `sample.py` runs, then
goes over the folder twice, with float32 and with bfloat16 compute (`dtype=` of the UNet and
ControlNet; params, VAE, CLIP, scheduler and latents stay float32). The script prints max and
mean |Δ| of `final_latents`, `decoded` and `image` against the golden and against the fp32 run,
and the PSNR of the bf16 image against the fp32 one. It needs torch, diffusers and transformers
(the `[test]` extra) unless `--e2e` names a folder.

Part 2 is `sample.py --demo`: the smoke model (`pasd_jax.fixtures.tiny`, random weights, built in
a temp folder exactly as `demo.demo_model_dir` builds it) on the generated demo image, with the
same seed in both dtypes, through the whole `Restorer` (colour fix, uint8). It prints the PSNR of
the bf16 image against the fp32 image.

float32 runs use `jax_default_matmul_precision=highest`, the parity setting of the golden
harnesses, so on a GPU the reference is true fp32 and not TF32. The last line printed is one JSON
object holding every figure.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from golden import e2e as e2e_harness  # noqa: E402
from pasd_jax.sampling import precision  # noqa: E402

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
COMPARED = ("final_latents", "decoded", "image")


# ---- part 1: the e2e golden case -----------------------------------------------------------------
def build_e2e_case(root: pathlib.Path, steps: int) -> dict:
    """Write the tiny e2e folder of `tests/sampling/e2e_test.py` under `root` (with `steps` DDIM
    steps) and return its golden tensors (that test's PyTorch procedure, float32, NCHW)."""
    from tests import e2e_case

    vae, clip, sched, inputs = e2e_case.build_e2e_dir(root, steps, note="tiny e2e folder built by "
                                                      "benchmarks/bf16_parity.py")
    return e2e_case.torch_reference(root, vae, clip, sched, inputs)


def _abs_err(a, b) -> dict:
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return {"max": float(d.max()), "mean": float(d.mean())}


def e2e_figures(e2e_dir: pathlib.Path, golden: dict | None, work: pathlib.Path) -> dict:
    """Run the e2e folder in both dtypes -> {tensor: {pair: {max, mean}}} plus the image PSNR (dB, [0, 1] peak)."""
    runs, seconds = {}, {}
    for name, dtype in DTYPES.items():
        t0 = time.perf_counter()
        path = e2e_harness.run_e2e(str(e2e_dir), str(work / name), dtype=dtype, log=lambda *_: None)
        runs[name], seconds[name] = load_file(path), time.perf_counter() - t0
    fig = {"steps": sum(1 for k in runs["float32"] if k.startswith("step")), "seconds": seconds}
    for tensor in COMPARED:
        pairs = {"bf16_vs_fp32": _abs_err(runs["bfloat16"][tensor], runs["float32"][tensor])}
        if golden is not None:
            pairs["bf16_vs_golden"] = _abs_err(runs["bfloat16"][tensor], golden[tensor])
            pairs["fp32_vs_golden"] = _abs_err(runs["float32"][tensor], golden[tensor])
        pairs["ref_max_abs"] = float(np.abs(runs["float32"][tensor]).max())
        fig[tensor] = pairs
    fig["image_psnr_db"] = precision.psnr(runs["bfloat16"]["image"], runs["float32"]["image"], peak=1.0)
    if golden is not None:
        fig["image_psnr_fp32_vs_golden_db"] = precision.psnr(runs["float32"]["image"], golden["image"], peak=1.0)
    return fig


# ---- part 2: the smoke demo ----------------------------------------------------------------------
def demo_figures(work: pathlib.Path, size: int, steps: int, seed: int) -> dict:
    """`sample.py --demo` in both dtypes, same seed -> PSNR (dB) and max |Δ| (uint8 levels) bf16 vs fp32."""
    from pasd_jax.assembly.loader import load_models
    from pasd_jax.fixtures import tiny
    from pasd_jax.sampling import demo
    from pasd_jax.sampling.pipeline import Restorer, RestoreOptions

    folder = tiny.make_tiny_pipeline(work / "tiny_pasd", family="pasd", seed=0)  # = demo.demo_model_dir()
    image = demo.demo_image(size)
    options = RestoreOptions(steps=steps, process_size=size)
    out, seconds = {}, {}
    for name, dtype in DTYPES.items():
        t0 = time.perf_counter()
        out[name] = Restorer(load_models(folder, dtype=dtype), options).restore(image, seed=seed).image
        seconds[name] = time.perf_counter() - t0
    diff = np.abs(out["bfloat16"].astype(np.int16) - out["float32"].astype(np.int16))
    return {"size": size, "steps": steps, "seed": seed, "seconds": seconds,
            "psnr_db": precision.psnr(out["bfloat16"], out["float32"]),
            "max_abs_uint8": int(diff.max()), "mean_abs_uint8": float(diff.mean())}


# ---- report --------------------------------------------------------------------------------------
def _print_e2e(fig: dict) -> None:
    print(f"e2e golden case, {fig['steps']} DDIM steps (fp32 {fig['seconds']['float32']:.1f} s, "
          f"bf16 {fig['seconds']['bfloat16']:.1f} s incl. compile):")
    for tensor in COMPARED:
        pairs = fig[tensor]
        cells = [f"{pair} max {v['max']:.3e} mean {v['mean']:.3e}" for pair, v in pairs.items() if isinstance(v, dict)]
        print(f"  {tensor:13s} (max|ref| {pairs['ref_max_abs']:.3g}): " + "; ".join(cells))
    extra = (f"; fp32 vs golden {fig['image_psnr_fp32_vs_golden_db']:.1f} dB"
             if "image_psnr_fp32_vs_golden_db" in fig else "")
    print(f"  image PSNR bf16 vs fp32: {fig['image_psnr_db']:.2f} dB{extra}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--e2e", type=pathlib.Path, help="an existing e2e folder (or its golden root) instead of "
                                                     "building the tiny one")
    ap.add_argument("--golden", type=pathlib.Path, help="with --e2e: the expected outputs.safetensors")
    ap.add_argument("--e2e-steps", type=int, default=3, help="steps of the built e2e case (default: %(default)s, "
                                                             "the golden test's)")
    ap.add_argument("--no-e2e", action="store_true", help="skip part 1")
    ap.add_argument("--no-demo", action="store_true", help="skip part 2")
    ap.add_argument("--demo-size", type=int, default=192, help="demo process size, px (default: %(default)s, "
                                                               "sample.py --demo's)")
    ap.add_argument("--demo-steps", type=int, default=20, help="demo steps (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")
    backend = jax.default_backend()
    report = {"backend": backend, "device": str(jax.devices()[0].device_kind),
              "auto_dtype": precision.default_dtype_name(backend)}
    print(f"backend {backend} ({report['device']}); --dtype auto here: {report['auto_dtype']}")
    with tempfile.TemporaryDirectory(prefix="bf16_parity_") as tmp:
        work = pathlib.Path(tmp)
        if not args.no_e2e:
            golden = load_file(str(args.golden)) if args.golden else None
            if args.e2e is None:
                try:
                    golden = build_e2e_case(work / "golden", args.e2e_steps)
                    e2e_dir = work / "golden" / "e2e"
                except ImportError as err:
                    print(f"e2e golden case skipped: {err} (install the [test] extra, or pass --e2e)")
                    e2e_dir = None
            else:
                e2e_dir = args.e2e
            if e2e_dir is not None:
                if golden is not None:
                    golden = {k: golden[k] for k in COMPARED}
                report["e2e"] = e2e_figures(e2e_dir, golden, work)
                _print_e2e(report["e2e"])
        if not args.no_demo:
            fig = report["demo"] = demo_figures(work, args.demo_size, args.demo_steps, args.seed)
            print(f"smoke demo, {fig['size']} px, {fig['steps']} steps, seed {fig['seed']} (fp32 "
                  f"{fig['seconds']['float32']:.1f} s, bf16 {fig['seconds']['bfloat16']:.1f} s incl. compile): "
                  f"PSNR bf16 vs fp32 {fig['psnr_db']:.2f} dB, max |Δ| {fig['max_abs_uint8']} / 255, "
                  f"mean |Δ| {fig['mean_abs_uint8']:.3f}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
