"""Per-block remat (`pasd_jax.nn.remat`): same parameter tree, same loss and gradients, and the
checkpoints really sit around every ResnetBlock2D / BasicTransformerBlock of UNet and ControlNet."""

import functools

import jax
import numpy as np
import pytest

from pasd_jax.assembly import defaults, registry
from pasd_jax.assembly.bundle import PASDBundle
from pasd_jax.assembly.init import init_params
from pasd_jax.diffusion.schedule import NoiseSchedule
from pasd_jax.models.controlnet import controlnet_params_from_unet
from pasd_jax.nn.remat import POLICIES, remat_block
from pasd_jax.nn.resnet import ResnetBlock2D
from pasd_jax.train.state import split
from pasd_jax.train.step import StepOptions, loss_fn
from tests.train.conftest import micro_configs

TRAINABLE = ("^controlnet/", "pixel_attentions")


def _models(configs, policy):
    build = lambda name: registry.build_module(configs[name])  # noqa: E731
    return PASDBundle(unet=build("unet").clone(remat_policy=policy),
                      controlnet=build("controlnet").clone(remat_policy=policy), vae=build("vae"),
                      text_encoder=build("text_encoder"), schedule=NoiseSchedule.from_config(defaults.SCHEDULER),
                      family="pasd", source="test")


@pytest.fixture(scope="module")
def setup():
    configs = micro_configs("pasd")
    params = {n: init_params(cfg, i) for i, (n, cfg) in enumerate(configs.items())}
    params["controlnet"] = controlnet_params_from_unet(params["unet"], params["controlnet"])
    rng = np.random.default_rng(0)
    batch = {"hq": rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32),
             "lq": rng.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32),
             "prompt_ids": rng.integers(0, 100, (2, 77)).astype(np.int32)}
    trainable, frozen = split(params, TRAINABLE)
    key = jax.random.key(3)
    ref = jax.jit(_grad_fn(_models(configs, "none")))(trainable, frozen, batch, key)
    return configs, params, batch, ref


def _grad_fn(models):
    fn = functools.partial(loss_fn, models=models, opts=StepOptions())
    return jax.value_and_grad(fn, has_aux=True)


REMAT_PRIMITIVES = ("checkpoint", "remat", "remat2")  # jax.checkpoint's primitive name by JAX version


def _count(jaxpr, names) -> int:
    """Equations whose primitive is in `names` in a jaxpr, nested ones included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name in names
        for p in eqn.params.values():
            for j in (p if isinstance(p, (list, tuple)) else [p]):
                if hasattr(j, "jaxpr") and hasattr(j.jaxpr, "eqns"):
                    n += _count(j.jaxpr, names)
                elif hasattr(j, "eqns"):
                    n += _count(j, names)
    return n


def test_remat_keeps_the_parameter_tree(setup):
    configs = setup[0]
    for name in ("unet", "controlnet"):
        ref = registry.abstract_params(registry.build_module(configs[name]))
        for policy in POLICIES:
            got = registry.abstract_params(registry.build_module(configs[name]).clone(remat_policy=policy))
            assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(ref), (name, policy)
            assert jax.tree.map(lambda s: s.shape, got) == jax.tree.map(lambda s: s.shape, ref)
    assert remat_block(ResnetBlock2D, "none") is ResnetBlock2D
    with pytest.raises(ValueError, match="unknown remat policy 'dot'"):
        remat_block(ResnetBlock2D, "dot")


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "none"])
def test_remat_same_loss_and_gradients(setup, policy):
    configs, params, batch, ((ref_loss, ref_aux), ref_grads) = setup
    trainable, frozen = split(params, TRAINABLE)
    key = jax.random.key(3)
    models = _models(configs, policy)
    (loss, aux), grads = jax.jit(_grad_fn(models))(trainable, frozen, batch, key)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for k in ref_aux:
        np.testing.assert_allclose(float(aux[k]), float(ref_aux[k]), rtol=1e-6, err_msg=k)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
    flat = dict(jax.tree_util.tree_leaves_with_path(grads))
    assert len(flat) == len(flat_ref)
    for path, g in flat_ref:
        np.testing.assert_allclose(np.asarray(flat[path]), np.asarray(g), rtol=1e-5, atol=1e-7,
                                   err_msg=jax.tree_util.keystr(path))
    # One checkpoint per resnet and per transformer block of the UNet and the ControlNet trunk.
    jaxpr = jax.make_jaxpr(_grad_fn(models))(trainable, frozen, batch, key)
    unet_cfg = configs["unet"]
    n_down = sum(unet_cfg.get("layers_per_block", 2) for _ in unet_cfg["down_block_types"])
    n_down_attn = sum(unet_cfg.get("layers_per_block", 2) for t in unet_cfg["down_block_types"] if "CrossAttn" in t)
    n_up = sum(unet_cfg.get("layers_per_block", 2) + 1 for _ in unet_cfg["up_block_types"])
    n_up_attn = sum(unet_cfg.get("layers_per_block", 2) + 1 for t in unet_cfg["up_block_types"] if "CrossAttn" in t)
    paca = n_up  # family "pasd": one PACA transformer per up layer
    resnets = 2 * (n_down + 2) + n_up  # UNet and ControlNet trunks (mid block: two resnets each)
    transformers = 2 * (n_down_attn + 1) + n_up_attn + paca
    assert _count(jaxpr.jaxpr, REMAT_PRIMITIVES) == resnets + transformers
    assert _count(jaxpr.jaxpr, ("name",)) >= 2 * transformers  # attn1 + attn2 outputs are tagged
