"""Test-wide settings: CPU only, offline, full-precision matmuls for parity checks."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pathlib

import pasd_jax  # noqa: F401  (sets the project's XLA:CPU defaults before any backend starts)
import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference"
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def reference_dir():
    """`../shared/reference`, or skip when the shared folder is not beside the checkout."""
    if not REFERENCE.is_dir():
        pytest.skip("../shared/reference is not present")
    return REFERENCE
