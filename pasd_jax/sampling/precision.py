"""Compute dtype of sampling: bfloat16 on GPU/TPU, float32 on CPU, with an explicit override.

`sample.py --dtype` takes `auto` (default), `float32` or `bfloat16`. `auto` resolves from the
JAX backend the run lands on (`jax.default_backend()`: "cpu", "gpu" for CUDA and ROCm, "tpu"):

* on CPU, float32. This is the parity path: the golden harnesses and the parity tests compare
  float32 runs with the PyTorch reference at 1e-5 + 1e-4·max|ref|. bf16 also buys nothing on a
  CPU, where XLA emulates most bf16 arithmetic.
* on GPU and TPU, bfloat16 compute for the UNet and the ControlNet. Params stay float32, and so
  do the VAE, CLIP, norm statistics, softmax, timestep embeddings, scheduler and latents
  (STYLE §2.3). `benchmarks/bf16_parity.py` measured the image error this costs (README
  "bf16 vs fp32"); `tests/sampling/precision_test.py` puts a floor under it.
* any other backend, or one we cannot name: float32.

The dtype applies to the models loaded for a run (`assembly.loader.load_models(dtype=...)`), so
it has to be resolved before loading. `psnr` is the closeness measure that backs the bf16
default; the benchmark and the test both use it. Mirrors no PASD code, because PASD samples in
fp16 on CUDA (`weight_dtype = torch.float16`) and has no CPU path.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from pasd_jax.sampling import defaults

DTYPE_NAMES = ("float32", "bfloat16")


def default_dtype_name(backend: str) -> str:
    """The `auto` compute dtype name for a JAX backend name ("cpu", "gpu", "cuda", "rocm", "tpu", ...).

    The lookup ignores case, because plugin backends report names such as "METAL". A name not
    listed in `defaults.BACKEND_DTYPES` gives "float32".
    """
    return defaults.BACKEND_DTYPES.get(str(backend).lower(), "float32")


def resolve_dtype_name(flag: Optional[str], backend: str) -> str:
    """`--dtype` value -> "float32" or "bfloat16": an explicit name wins, and `auto` or None goes by `backend`."""
    if flag in (None, defaults.DTYPE_AUTO):
        return default_dtype_name(backend)
    if flag not in DTYPE_NAMES:
        raise ValueError(f"--dtype must be one of {', '.join(defaults.DTYPES)}, got {flag!r}")
    return flag


def compute_dtype(flag: Optional[str] = defaults.DTYPE_AUTO, backend: Optional[str] = None):
    """`--dtype` value -> the jnp dtype for `load_models(dtype=...)`; `backend` None is `jax.default_backend()`."""
    import jax
    import jax.numpy as jnp

    name = resolve_dtype_name(flag, jax.default_backend() if backend is None else backend)
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def describe(flag: Optional[str], backend: str) -> str:
    """One log line giving the dtype a run computes in and why, e.g. "compute dtype bfloat16 (auto on gpu)"."""
    name = resolve_dtype_name(flag, backend)
    why = f"auto on {backend}" if flag in (None, defaults.DTYPE_AUTO) else "--dtype"
    return f"compute dtype {name} ({why}; weights, VAE and text encoder float32)"


def psnr(a, b, peak: float = 255.0) -> float:
    """PSNR in dB between two images of the same shape (uint8 by default, `peak` 1.0 for [0, 1] floats).

    Identical images give `inf`. The mean runs over every pixel and channel in float64.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ, {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0.0 else float(10.0 * np.log10(peak * peak / mse))
