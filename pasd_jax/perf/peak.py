"""Peak dense TFLOP/s per chip by `device_kind`, and model-FLOPs utilisation (MFU).

Vendor figures for dense matrix maths (no structured sparsity), per chip:

    device_kind contains   bf16    fp32   (fp32 = what a float32 run is measured against)
    H100 / H200            989.0   494.5  SXM; fp32 = TF32 tensor cores (XLA's default f32 dot precision)
    A100                   312.0   156.0  fp32 = TF32
    L4                     121.0    60.0  fp32 = TF32
    TPU v4                 275.0   275.0  TPU f32 dots at default precision are bf16 MXU passes
    TPU v5 lite / v5e      197.0   197.0
    TPU v5p / TPU v5       459.0   459.0
    TPU v6 lite / v6e      918.0   918.0

A float32 run under `jax_default_matmul_precision=highest` does several passes per dot and is
compared against the same fp32 figure (its MFU is then low by design). CPUs have no entry:
`peak_tflops` returns None and benchmarks print FLOP/s only. `--peak-tflops` (see `add_argument`)
overrides the table, e.g. for a PCIe H100 (756 bf16) or an unlisted chip.
"""

from __future__ import annotations

import argparse
from typing import Optional

import jax
import jax.numpy as jnp

#: (substring of device_kind, lower-case) -> (bf16 TFLOP/s, fp32 TFLOP/s). First match wins.
PEAK_TFLOPS: tuple[tuple[str, tuple[float, float]], ...] = (
    ("h100", (989.0, 494.5)), ("h200", (989.0, 494.5)), ("gh200", (989.0, 494.5)),
    ("a100", (312.0, 156.0)), ("l4", (121.0, 60.0)),
    ("tpu v4", (275.0, 275.0)), ("tpu v5 lite", (197.0, 197.0)), ("tpu v5e", (197.0, 197.0)),
    ("tpu v5p", (459.0, 459.0)), ("tpu v5", (459.0, 459.0)),
    ("tpu v6 lite", (918.0, 918.0)), ("tpu v6e", (918.0, 918.0)),
)


def peak_tflops(device_kind: Optional[str] = None, dtype=jnp.bfloat16,
                override: Optional[float] = None) -> Optional[float]:
    """Peak TFLOP/s of one chip for a compute dtype; `override` wins; None when unknown (CPU)."""
    if override:
        return float(override)
    kind = (device_kind if device_kind is not None else jax.devices()[0].device_kind).lower()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    for key, (bf16, fp32) in PEAK_TFLOPS:
        if key in kind:
            return bf16 if half else fp32
    return None


def mfu(flops: float, seconds: float, peak: Optional[float], n_devices: int = 1) -> Optional[float]:
    """flops / (seconds · peak TFLOP/s · 1e12 · n_devices) as a fraction, None without a peak."""
    if not peak or seconds <= 0:
        return None
    return float(flops) / (seconds * peak * 1e12 * n_devices)


def describe(flops: float, seconds: float, peak: Optional[float], n_devices: int = 1) -> str:
    """'12.3 TFLOP/s, MFU 4.5 %' (or '… TFLOP/s (no peak for this device)') for benchmark lines."""
    rate = float(flops) / seconds / 1e12 if seconds > 0 else float("nan")
    util = mfu(flops, seconds, peak, n_devices)
    tail = f"MFU {100 * util:.1f} % of {peak:g} TFLOP/s × {n_devices}" if util is not None else \
        "no peak for this device (--peak-tflops)"
    return f"{rate:.3f} TFLOP/s, {tail}"


def add_argument(parser: argparse.ArgumentParser) -> None:
    """Add `--peak-tflops` (per-chip peak override) to a benchmark's parser."""
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak TFLOP/s of one chip (default: table in pasd_jax/perf/peak.py; none on CPU)")
