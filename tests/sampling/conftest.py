"""Shared fixtures of the sampling tests."""

import jax
import pytest


@pytest.fixture(scope="module")
def fast_compile():
    """Tiny models: XLA's optimisation passes cost more compile time than they save at run time."""
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)
