"""XLA:CPU options the project sets by default, before JAX creates its CPU client.

jaxlib 0.10 routes convolutions, dots and reductions of the CPU backend through YNNPACK fusions
(`--xla_cpu_experimental_ynn_fusion_type`, on by default). On this project's networks that path is
slower than XLA's own kernels: one CFG step of the SD1.5-size ControlNet + PASD UNet at a 32²
latent (`python benchmarks/cfg_step.py --latent 32 --only jax`, 2-core AVX-512 Xeon, fp32) takes
4.13 s with it and 2.87–2.97 s with the flag empty (YNNPACK off), the 3×3 convolutions being the
slow part; outputs move by 2.7e-6 relative (the parity tests are unchanged). Other options tried
(oneDNN custom calls, thunk runtime off, Eigen threading, XNNPACK on/off and its graph fusion,
fast math, `--xla_cpu_opt_preset`) changed the step by less than 5 %.

`apply_defaults()` appends the flags to `XLA_FLAGS` unless the user's `XLA_FLAGS` already names
them, `PASD_JAX_XLA_DEFAULTS=0` is set, or the installed jaxlib is not one they were measured on
(an unknown flag makes XLA abort). It runs when `pasd_jax` is imported, so sample.py, train.py,
the converter, the benchmarks and the tests all get it; it has no effect when JAX's CPU client
already exists (flags are read once) and none on GPU/TPU kernels (the flags are CPU-only).
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import MutableMapping

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
MEASURED_JAXLIB = ("0.10.",)  # versions whose XLA has these flags (measured on 0.10.2)
OPT_OUT = "PASD_JAX_XLA_DEFAULTS"


def _jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ""


def apply_defaults(environ: MutableMapping[str, str] = os.environ, jaxlib_version: str | None = None) -> list[str]:
    """Add the missing `CPU_FLAGS` to `environ["XLA_FLAGS"]`; returns the flags added."""
    if environ.get(OPT_OUT, "1") == "0":
        return []
    version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
    if not version.startswith(MEASURED_JAXLIB):
        return []
    current = environ.get("XLA_FLAGS", "")
    added = [f for f in CPU_FLAGS if f.split("=", 1)[0] not in current]
    if added:
        environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
