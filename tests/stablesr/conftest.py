"""StableSR tests: the dev golden set is read from ../shared (skipped when absent); the converted
golden model is built once per session."""

import pathlib

import numpy as np
import pytest

from tests.conftest import REFERENCE

GOLDEN = REFERENCE / "stablesr_golden"


def compare_ok(cand, ref, atol=1e-5, rtol=1e-4) -> tuple[bool, float]:
    """compare.py's criterion: max|cand − ref| <= atol + rtol·max|ref| (integers: exact)."""
    ref, cand = np.asarray(ref), np.asarray(cand)
    assert cand.shape == ref.shape, (cand.shape, ref.shape)
    if ref.dtype.kind in "iu":
        return bool(np.array_equal(ref, cand)), 0.0
    err = float(np.abs(cand.astype(np.float64) - ref).max())
    return err <= atol + rtol * float(np.abs(ref).max()), err


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    if not (GOLDEN / "manifest.json").is_file():
        pytest.skip("../shared/reference/stablesr_golden is not present")
    return GOLDEN


@pytest.fixture(scope="session")
def golden_manifest(golden_dir):
    import json

    return json.loads((golden_dir / "manifest.json").read_text())


@pytest.fixture(scope="session")
def golden_models(golden_dir, golden_manifest):
    from golden.stablesr import load_models

    return load_models(str(golden_dir), golden_manifest)


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
    """Tiny models: XLA's optimisation passes cost more compile time than they save at run time."""
    import jax

    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)
