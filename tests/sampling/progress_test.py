"""Per-step progress from inside the compiled scan: every step reported, one compilation for any
number of calls and listeners, results identical to a run without progress."""

from __future__ import annotations

import dataclasses
import io

import jax
import numpy as np
import pytest

from pasd_jax.assembly.loader import load_models
from pasd_jax.fixtures import tiny
from pasd_jax.sampling import progress
from pasd_jax.sampling.sampler import Noises, Sampler, SamplerSettings, latent_shape, make_inputs

STEPS = 3

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "pasd"
    tiny.make_tiny_pipeline(folder, seed=0, levels=2)
    return load_models(folder)


def _inputs(models, seed):
    rng = np.random.default_rng(seed)
    lq = rng.random((1, 16, 16, 3), dtype=np.float32)
    text = rng.standard_normal((2, 77, 32)).astype(np.float32)
    noises = Noises.draw(jax.random.key(seed), latent_shape(models, lq.shape))
    return make_inputs(lq, text, noises, guidance_scale=7.5, added_noise_level=900)


def test_every_step_reported_without_recompiling_and_same_result(models):
    quiet = Sampler(models, SamplerSettings(num_steps=STEPS))
    loud = Sampler(models, SamplerSettings(num_steps=STEPS, progress=True))
    seen_a, seen_b = [], []
    with progress.listen(seen_a.append):
        a = jax.block_until_ready(loud(_inputs(models, 0)))
    jax.effects_barrier()
    with progress.listen(seen_b.append):  # another listener, other values: the same program
        jax.block_until_ready(loud(_inputs(models, 1)))
    jax.effects_barrier()
    assert sorted(seen_a) == list(range(STEPS)) and sorted(seen_b) == list(range(STEPS))
    assert loud.trace_count == 1
    jax.block_until_ready(loud(_inputs(models, 2)))  # no listener: nothing reported, nothing breaks
    jax.effects_barrier()
    assert len(seen_a) == STEPS and loud.trace_count == 1
    np.testing.assert_array_equal(a["image"], quiet(_inputs(models, 0))["image"])


def test_step_bar_counts_steps_and_closes():
    out = io.StringIO()
    bar = progress.StepBar(total=4, desc="x.png", file=out)
    with progress.listen(bar):
        for step in (0, 1, 1, 3):  # repeated / skipped steps (several calls per image) never go back
            progress.emit(np.int32(step))
        assert bar.steps_done == 4
    assert progress._listener is None  # restored after the block
    progress.emit(0)  # no listener: ignored
    assert "x.png" in out.getvalue()
