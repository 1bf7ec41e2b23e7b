"""The train step on the micro model: gradient accumulation = one big batch; bf16 frozen weights."""

import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pasd_jax.assembly import defaults, registry
from pasd_jax.assembly.bundle import PASDBundle
from pasd_jax.assembly.init import init_params
from pasd_jax.diffusion.schedule import NoiseSchedule
from pasd_jax.models.controlnet import controlnet_params_from_unet
from pasd_jax.train.optim import make_optimizer
from pasd_jax.train.state import TrainState, split
from pasd_jax.train.step import StepOptions, loss_fn, train_step
from tests.train.conftest import micro_configs

TRAINABLE = ("^controlnet/", "pixel_attentions")


@pytest.fixture(scope="module")
def setup():
    configs = micro_configs("pasd")
    params = {n: init_params(cfg, i) for i, (n, cfg) in enumerate(configs.items())}
    params["controlnet"] = controlnet_params_from_unet(params["unet"], params["controlnet"])
    build = lambda name: registry.build_module(configs[name])  # noqa: E731
    models = PASDBundle(unet=build("unet"), controlnet=build("controlnet"), vae=build("vae"),
                        text_encoder=build("text_encoder"), schedule=NoiseSchedule.from_config(defaults.SCHEDULER),
                        family="pasd", source="test")
    rng = np.random.default_rng(0)
    batch = {"hq": rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32),
             "lq": rng.uniform(0, 1, (4, 32, 32, 3)).astype(np.float32),
             "prompt_ids": rng.integers(0, 100, (4, 77)).astype(np.int32)}
    return models, params, batch


def _optim(grad_accum: int):
    # eps = 1: Adam's first update is lr * g / (|g| + eps) ~ lr * g, so it keeps the gradient's scale
    # (a wrong 1/k shows) and is well conditioned. With eps = 1e-8 it is lr * sign(g), which flips for
    # gradients near zero when the summation order changes (1 element in 8192 did so on CI).
    return make_optimizer(SimpleNamespace(lr=1e-3, warmup_steps=0, b1=0.9, b2=0.999, eps=1.0, weight_decay=1e-2,
                                          clip_norm=1.0, grad_accum=grad_accum))


def test_grad_accum_gives_the_update_of_one_big_batch(setup):
    models, params, batch = setup
    trainable, frozen = split(params, TRAINABLE)
    half = lambda i: {k: v[2 * i:2 * i + 2] for k, v in batch.items()}  # noqa: E731
    results = {}
    for k in (1, 2):
        tx, lr_fn = _optim(k)
        step = jax.jit(functools.partial(train_step, models=models, tx=tx, lr_fn=lr_fn, opts=StepOptions(),
                                         grad_accum=k))
        state = TrainState.create(trainable, tx, seed=0)
        if k == 1:
            state, metrics = step(state, frozen, batch)
        else:
            mid, m0 = step(state, frozen, half(0))
            for leaf, before in zip(jax.tree_util.tree_leaves(mid.params), jax.tree_util.tree_leaves(trainable)):
                np.testing.assert_array_equal(np.asarray(leaf), np.asarray(before))  # first micro-step: no update
            state, m1 = step(mid, frozen, half(1))
            metrics = {"loss": (m0["loss"] + m1["loss"]) / 2}
        results[k] = (state, metrics)
    (big, m_big), (acc, m_acc) = results[1], results[2]
    np.testing.assert_allclose(float(m_acc["loss"]), float(m_big["loss"]), rtol=1e-5)
    leaves = zip(jax.tree_util.tree_leaves_with_path(acc.params), jax.tree_util.tree_leaves(big.params),
                 jax.tree_util.tree_leaves(trainable))
    for (path, a), b, t in leaves:  # the updates agree to 0.1 % of the largest update in each tensor
        da, db = np.asarray(a, np.float64) - np.asarray(t), np.asarray(b, np.float64) - np.asarray(t)
        np.testing.assert_allclose(da, db, rtol=1e-3, atol=1e-3 * np.abs(db).max() + 1e-12,
                                   err_msg=jax.tree_util.keystr(path))
    changed = [not np.allclose(np.asarray(a), np.asarray(t)) for a, t in
               zip(jax.tree_util.tree_leaves(acc.params), jax.tree_util.tree_leaves(trainable))]
    assert sum(changed) > len(changed) // 2  # the accumulated update really moved the parameters


def test_bf16_frozen_weights_keep_fp32_trainables(setup):
    models, params, batch = setup
    trainable, frozen = split(params, TRAINABLE)
    frozen16 = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(jnp.bfloat16), frozen)
    fn = jax.jit(jax.value_and_grad(functools.partial(loss_fn, models=models, opts=StepOptions()), has_aux=True))
    (loss32, _), _ = fn(trainable, frozen, batch, jax.random.key(1))
    (loss16, _), grads16 = fn(trainable, frozen16, batch, jax.random.key(1))
    assert np.isfinite(float(loss16))
    np.testing.assert_allclose(float(loss16), float(loss32), rtol=3e-2)
    assert {x.dtype for x in jax.tree_util.tree_leaves(grads16)} == {jnp.dtype(jnp.float32)}
    tx, _ = _optim(1)
    state = TrainState.create(trainable, tx, seed=0)
    assert {x.dtype for x in jax.tree_util.tree_leaves((state.params, state.opt_state)) if jnp.issubdtype(
        x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
