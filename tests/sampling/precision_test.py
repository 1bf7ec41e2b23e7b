"""Compute dtype policy of sampling (`pasd_jax.sampling.precision`) and the bf16-vs-fp32 image floor.

The default is resolved from a backend *name*, so the GPU/TPU branch is tested on a CPU. The
floor test runs the tiny smoke pipeline (two levels, 48 px, 4 steps, CFG, wavelet colour fix) with
the same seed in float32 and in bfloat16 compute and requires the bf16 image to stay close to the
fp32 one. It also requires the two images to differ, which shows the dtype reached the networks.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from pasd_jax.assembly.loader import load_models
from pasd_jax.fixtures import tiny
from pasd_jax.sampling import defaults, demo, precision
from pasd_jax.sampling.pipeline import Restorer, RestoreOptions

# Measured on CPU for this configuration (jax 0.10.2): 41.3 dB. At 64 px it was 41.4, 40.8 and
# 41.3 dB for seeds 3, 0 and 1. benchmarks/bf16_parity.py gives 44.0 dB (e2e golden case) and 43.3 dB (192 px
# demo). The floor leaves about 6 dB of margin for other XLA builds and CPUs. It catches a bf16
# path that breaks, such as an overflow, a NaN, or a norm or softmax whose precision loss shifts
# the image. It cannot tell a bf16 VAE from a float32 one (41.1 vs 41.4 dB measured), so the
# fixture asserts the module dtypes instead.
PSNR_FLOOR_DB = 35.0


@pytest.mark.parametrize("backend, want", [("cpu", "float32"), ("gpu", "bfloat16"), ("cuda", "bfloat16"),
                                           ("rocm", "bfloat16"), ("tpu", "bfloat16"), ("TPU", "bfloat16"),
                                           ("METAL", "float32"), ("", "float32")])
def test_auto_is_bf16_on_accelerators_and_fp32_elsewhere(backend, want):
    assert precision.default_dtype_name(backend) == want
    assert precision.resolve_dtype_name("auto", backend) == want
    assert precision.resolve_dtype_name(None, backend) == want
    assert precision.compute_dtype("auto", backend) == (jnp.bfloat16 if want == "bfloat16" else jnp.float32)


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_explicit_dtype_overrides_the_backend(backend):
    assert precision.compute_dtype("float32", backend) == jnp.float32
    assert precision.compute_dtype("bfloat16", backend) == jnp.bfloat16
    assert "--dtype" in precision.describe("float32", backend)
    assert f"auto on {backend}" in precision.describe("auto", backend)


def test_flag_choices_and_unknown_names():
    assert defaults.DTYPE == "auto" and set(defaults.DTYPES) == {"auto", *precision.DTYPE_NAMES}
    with pytest.raises(ValueError, match="--dtype"):
        precision.resolve_dtype_name("float16", "gpu")


def test_psnr():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    assert precision.psnr(a, b) == float("inf")
    b[0, 0, 0] = 255  # mse = 255² / 48
    assert precision.psnr(a, b) == pytest.approx(10 * np.log10(48))
    assert precision.psnr(np.zeros(3), np.full(3, 0.1), peak=1.0) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="shapes"):
        precision.psnr(a, b[:2])


@pytest.fixture(scope="module")
def restored(tmp_path_factory, fast_compile):
    folder = tiny.make_tiny_pipeline(tmp_path_factory.mktemp("models") / "pasd", seed=0, levels=2)
    image = demo.demo_image(48)
    options = RestoreOptions(steps=4, process_size=48)
    out = {}
    for name in precision.DTYPE_NAMES:
        models = load_models(folder, dtype=precision.compute_dtype(name, "cpu"))
        assert models.unet.dtype == models.controlnet.dtype == precision.compute_dtype(name)
        assert models.vae.dtype == jnp.float32  # the VAE stays float32 (STYLE §2.3)
        out[name] = Restorer(models, options).restore(image, seed=3).image
    return out


def test_bf16_image_stays_close_to_fp32(restored):
    fp32, bf16 = restored["float32"], restored["bfloat16"]
    assert fp32.shape == bf16.shape == (48, 48, 3) and bf16.dtype == np.uint8
    value = precision.psnr(bf16, fp32)
    assert value != float("inf"), "bf16 and fp32 gave the same image: the dtype did not reach the networks"
    assert value >= PSNR_FLOOR_DB, f"bf16 vs fp32 PSNR {value:.2f} dB is below the {PSNR_FLOOR_DB} dB floor"
