"""PASD ControlNet: golden parity (fixture subset), zero init, `from_unet`, distinct widths, full-size keys."""

import functools
import json
import pathlib

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from convert.mapping import torch_to_flax
from golden import harness as golden
from pasd_jax.assembly.paths import flatten
from pasd_jax.models import controlnet as cn_lib
from pasd_jax.models import unet as unet_lib
from pasd_jax.models.configs import UnsupportedConfigError
from tests.torch_oracle import assert_close

GOLDEN_FIXTURE = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "golden"
VARIANTS = ("pasd", "pasd_rrdb", "pasd_light", "pasd_light_rrdb")
ZERO_CONV_PREFIXES = ("controlnet_down_blocks_", "controlnet_mid_block")

# 2-level toy config: cheap to init; odd latent 5×3 still exercises ceil-halving. Equal widths
# because PASD's UpBlock2D PACA needs C_last == C_prev (PASD_REFERENCE §9.2).
TINY_UNET = dict(block_out_channels=[8, 8], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], norm_num_groups=4, attention_head_dim=2,
                 cross_attention_dim=8, layers_per_block=1)
# Distinct widths / per-block heads / cross dim ≠ 32, like the hidden golden set.
DISTINCT_UNET = dict(block_out_channels=[32, 48, 64, 64], norm_num_groups=16, attention_head_dim=[1, 2, 4, 4],
                     cross_attention_dim=24, layers_per_block=1)  # 1 layer: halves compile time


def random_params(abstract, seed=0):
    """Random weights with roughly unit activations for a `jax.eval_shape` parameter tree."""
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, 1 / np.sqrt(np.prod(spec.shape[:-1])), spec.shape).astype(spec.dtype)
        if name == "scale":
            return (1 + 0.1 * rng.normal(size=spec.shape)).astype(spec.dtype)
        return (0.1 * rng.normal(size=spec.shape)).astype(spec.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


@functools.lru_cache(maxsize=None)
def abstract_params(module):
    """Cached per (hashable, unbound) module: the full-size variants share configs."""
    return jax.eval_shape(lambda: module.init(jax.random.key(0), **module.init_inputs()))["params"]


# XLA CPU compile options for test-only programs: ~3× faster init compiles, ~1.5× faster forwards.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_init(module, seed=0):
    """Real `module.init` (the module's own initialisers) compiled without XLA's slow CPU passes."""
    key = jax.random.key(seed)
    init = jax.jit(lambda k: module.init(k, **module.init_inputs())["params"])
    return init.lower(key).compile(FAST_COMPILE)(key)


# ---- (a) golden parity on the fixture subset ------------------------------------------------
def test_golden_fixture_parity(tmp_path):
    lines = []
    written = golden.run_golden(str(GOLDEN_FIXTURE), str(tmp_path), log=lines.append)
    manifest = json.loads((GOLDEN_FIXTURE / "manifest.json").read_text())
    cases = [(v, c) for v in manifest["variants"].values() for c in v["cases"].values()]
    assert len(written) == len(cases) and len(lines) > len(cases)
    for variant, case in cases:
        ref = load_file(GOLDEN_FIXTURE / case["outputs"])
        got = load_file(tmp_path / case["outputs"])
        assert sorted(got) == sorted(ref)
        for name, want in ref.items():
            assert got[name].dtype == np.float32 and got[name].flags.c_contiguous, name
            assert_close(got[name], want)  # compare.py's rule: atol 1e-5 + rtol 1e-4·max|ref|


def test_golden_cli_errors(tmp_path, capsys):
    assert golden.main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert golden.main([str(GOLDEN_FIXTURE), str(tmp_path / "out"), "--variants", "nope"]) == 2
    assert "not in" in capsys.readouterr().err


def test_detect_unet_family():
    assert golden.detect_unet_family(["up_blocks.1.pixel_attentions.0.proj_in.weight"]) == "pasd"
    assert golden.detect_unet_family(["up_blocks.1.attentions.0.transformer_blocks.0.attn2_plus.to_q.weight"]) \
        == "pasd_light"
    with pytest.raises(golden.GoldenError, match="conv_in.weight"):
        golden.detect_unet_family(["conv_in.weight", "up_blocks.0.resnets.0.conv1.weight"])


# ---- (b), (c) zero init and from_unet ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    cn = cn_lib.from_config(cn_lib.controlnet_config_from_unet(
        TINY_UNET, conditioning_embedding_out_channels=[4, 8], use_rrdb=True))
    rng = np.random.default_rng(0)
    inputs = dict(sample=rng.normal(size=(2, 5, 3, 4)).astype(np.float32), timestep=np.array([999, 3]),
                  encoder_hidden_states=rng.normal(size=(2, 6, 8)).astype(np.float32),
                  controlnet_cond=rng.uniform(size=(2, 10, 6, 3)).astype(np.float32))
    apply = jax.jit(lambda p, scale: cn.apply({"params": p}, **inputs, conditioning_scale=scale))
    return cn, fast_init(cn, seed=1), apply


def _assert_zero_residuals(apply, params):
    rgbs, down, mid = apply(params, 0.8)
    assert [r.shape for r in rgbs] == [(2, 5, 3, 3)]
    assert all(np.abs(np.asarray(r)).max() > 0 for r in rgbs)
    assert len(down) == 4 and mid.shape == (2, 3, 2, 8)
    assert all(not np.any(np.asarray(r)) for r in down + [mid])


def test_fresh_controlnet_residuals_are_zero(tiny):
    cn, params, apply = tiny
    flat = flatten(params)
    for path, leaf in flat.items():
        zero = path[0].startswith(ZERO_CONV_PREFIXES) or path[:2] == ("controlnet_cond_embedding", "conv_out")
        if zero:
            assert not np.any(np.asarray(leaf)), path
        elif path[-1] == "kernel":
            assert np.any(np.asarray(leaf)), path
    assert ("controlnet_cond_embedding", "preprocesser_1", "rdb3", "conv5", "kernel") in flat
    _assert_zero_residuals(apply, params)


@pytest.mark.parametrize("family", ["stock", "pasd"])
def test_controlnet_params_from_unet(tiny, family):
    cn, cn_params, apply = tiny
    unet = unet_lib.from_config(TINY_UNET, family=family)
    unet_params = jax.tree_util.tree_map(np.asarray, random_params(abstract_params(unet), seed=2))
    merged = cn_lib.controlnet_params_from_unet(unet_params, cn_params)
    flat, uflat, cflat = flatten(merged), flatten(unet_params), flatten(cn_params)
    assert set(flat) == set(cflat)
    n_copied = 0
    for path, leaf in flat.items():
        if cn_lib.is_trunk_param(path[0]):
            assert np.array_equal(np.asarray(leaf), uflat[path]), path
            n_copied += 1
        else:
            assert leaf is cflat[path], path
    assert n_copied == sum(cn_lib.is_trunk_param(p[0]) for p in cflat) > 0
    _assert_zero_residuals(apply, merged)

    wrong = unet_lib.from_config(dict(TINY_UNET, cross_attention_dim=12), family=family)
    with pytest.raises(ValueError, match="does not match"):
        cn_lib.controlnet_params_from_unet(random_params(abstract_params(wrong)), cn_params)


def test_channel_order_pooling_guess_mode(tiny):
    cn, _, _ = tiny
    params = random_params(abstract_params(cn), seed=3)  # non-zero residuals
    rng = np.random.default_rng(1)
    x, t, ctx = rng.normal(size=(1, 4, 4, 4)), np.array([7]), rng.normal(size=(1, 3, 8))
    cond = rng.uniform(size=(1, 8, 8, 3))
    bgr_pooled = cn.clone(controlnet_conditioning_channel_order="bgr", global_pool_conditions=True)

    @jax.jit
    def runs(params):
        run = lambda m, c, **kw: m.apply({"params": params}, x, t, ctx, c, conditioning_scale=0.5, **kw)
        return run(cn, cond), run(bgr_pooled, cond[..., ::-1]), run(cn, cond, guess_mode=True)

    (rgbs, down, mid), (rgbs_b, down_b, mid_b), (_, down_g, mid_g) = runs(params)
    for a, b in zip(rgbs, rgbs_b):  # bgr flips the channels back; rgbs are never pooled
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    for got, want in zip(down_b + [mid_b], down + [mid]):
        assert got.shape[1:3] == (1, 1)
        np.testing.assert_allclose(got, np.mean(want, axis=(1, 2), keepdims=True), rtol=1e-5, atol=1e-6)
    scales = np.logspace(-1, 0, len(down) + 1)  # guess mode: raw·logspace(-1, 0, n+1)·scale
    for s, got, want in zip(scales, down_g + [mid_g], down + [mid]):
        np.testing.assert_allclose(got, want * s, rtol=1e-5, atol=1e-6)


# ---- (d) distinct widths, odd latent, both PASD families ------------------------------------
@pytest.mark.parametrize("family", ["pasd", "pasd_light"])
def test_distinct_widths_end_to_end(family):
    unet = unet_lib.from_config(DISTINCT_UNET, family=family)
    cn = cn_lib.from_config(cn_lib.controlnet_config_from_unet(
        DISTINCT_UNET, conditioning_embedding_out_channels=[8, 16, 24, 32], use_rrdb=family == "pasd"))
    rng = np.random.default_rng(0)
    inputs = dict(sample=rng.normal(size=(2, 17, 12, 4)).astype(np.float32), timestep=np.array([999, 1], np.int32),
                  text=rng.normal(size=(2, 5, 24)).astype(np.float32),
                  cond=rng.uniform(size=(2, 136, 96, 3)).astype(np.float32), scale=np.float32(0.7))
    params = (random_params(abstract_params(cn), 1), random_params(abstract_params(unet), 2))
    args = params + tuple(inputs[k] for k in ("sample", "timestep", "text", "cond", "scale"))
    forward = golden.make_forward(cn, unet).lower(*args).compile(FAST_COMPILE)
    out = golden.run_case(forward, *params, inputs)
    sizes = [(17, 12)] * 2 + [(9, 6)] * 2 + [(5, 3)] * 2 + [(3, 2)] * 2  # stride 2 = ceil halving
    chans = [32, 32, 32, 48, 48, 64, 64, 64]
    want = {f"controlnet.rgbs.{i}": (2, 3, 136 >> (i + 1), 96 >> (i + 1)) for i in range(3)}
    want.update({f"controlnet.down_res.{i:02d}": (2, c) + s for i, (c, s) in enumerate(zip(chans, sizes))})
    want.update({"controlnet.mid_res": (2, 64, 3, 2), "unet.sample": (2, 4, 17, 12)})
    assert {k: v.shape for k, v in out.items()} == want
    assert all(np.all(np.isfinite(v)) and np.abs(v).max() > 0 for v in out.values())


# ---- full-size (SD1.5) structure against the reference key dumps ----------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_full_size_controlnet_keys(reference_dir, variant):
    ref = json.loads((reference_dir / "keys" / f"{variant}_controlnet.json").read_text())
    module = cn_lib.from_config(ref["config"])
    assert module.use_rrdb == variant.endswith("_rrdb") and module.return_rgbs
    abstract = abstract_params(module)
    state = {k: np.broadcast_to(np.float32(0), shape) for k, shape in ref["keys"].items()}
    torch_to_flax(state, abstract, what=f"{variant}_controlnet")  # strict: names and shapes 1:1
    assert len(flatten(abstract)) == ref["num_keys"]

    # from_unet config on the SD1.5 UNet config builds the same tree (PASD training path, §6).
    sd15 = json.loads((reference_dir / "sd15" / "unet" / "config.json").read_text())
    from_unet = cn_lib.from_config(cn_lib.controlnet_config_from_unet(sd15, use_rrdb=module.use_rrdb))
    shapes = lambda tree: {p: s.shape for p, s in flatten(tree).items()}
    assert shapes(abstract_params(from_unet)) == shapes(abstract)


def test_from_config_rejects_unsupported():
    with pytest.raises(UnsupportedConfigError, match="controlnet_conditioning_channel_order"):
        cn_lib.from_config(dict(TINY_UNET, controlnet_conditioning_channel_order="rbg"))
    with pytest.raises(UnsupportedConfigError, match="class_embed_type"):
        cn_lib.from_config(dict(TINY_UNET, class_embed_type="timestep"))
