"""Tiled VAE: geometry, one tile == untiled, multi-tile ≈ untiled, shared GroupNorm statistics,
parameter paths unchanged by the tiling switches. Tiny 8× VAE, small images, CPU."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import traverse_util

from pasd_jax.assembly import registry
from pasd_jax.assembly.init import init_params
from pasd_jax.fixtures import tiny
from pasd_jax.models import vae as vae_lib
from pasd_jax.nn import resnet as resnet_lib
from pasd_jax.nn.resnet import BatchPooledGroupNorm, group_norm
from pasd_jax.sampling import tiled_vae as tv


@pytest.fixture(scope="module")
def vae():
    config = tiny.tiny_vae_config()
    return registry.build_module(config), init_params(config, seed=0)


def _smooth_image(b, h, w, seed):
    """A smooth random image in [-1, 1] (bilinear upsampling of coarse noise), [b, h, w, 3]."""
    coarse = np.random.default_rng(seed).uniform(-1, 1, (b, h // 16 + 2, w // 16 + 2, 3))
    return jax.image.resize(jnp.asarray(coarse, jnp.float32), (b, h, w, 3), "linear")


@functools.partial(jax.jit, static_argnums=0)
def _encode(module, params, x):
    return module.apply({"params": params}, x, method="encode")


@functools.partial(jax.jit, static_argnums=0)
def _decode(module, params, z):
    return module.apply({"params": params}, z, method="decode")


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _tiled_encode(module, params, x, tile=tv.ENCODER_TILE, pad=tv.ENCODER_PAD, chunk=tv.DEFAULT_QUERY_CHUNK):
    return tv.tiled_encode(module, params, x, tile=tile, pad=pad, attention_query_chunk=chunk)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _tiled_decode(module, params, z, tile=tv.DECODER_TILE, pad=tv.DECODER_PAD, chunk=tv.DEFAULT_QUERY_CHUNK):
    return tv.tiled_decode(module, params, z, tile=tile, pad=pad, attention_query_chunk=chunk)


# ---------------------------------------------------------------- geometry

@pytest.mark.parametrize("h,w,tile,pad,m", [
    (4096, 4096, 1024, 32, 8), (512, 512, 224, 11, 1), (1096, 200, 1024, 32, 8), (2000, 300, 224, 11, 1),
    (128, 96, 32, 8, 8), (97, 250, 40, 5, 1), (64, 64, 16, 8, 8), (33, 33, 64, 16, 1)])
def test_layout_covers_with_equal_windows(h, w, tile, pad, m):
    tiles = tv.tile_layout(h, w, tile, pad, m)
    cover = np.zeros((h, w), np.int32)
    sizes = set()
    for (cy0, cy1, cx0, cx1), (py0, py1, px0, px1) in tiles:
        cover[cy0:cy1, cx0:cx1] += 1
        sizes.add((py1 - py0, px1 - px0))
        assert 0 <= py0 <= cy0 < cy1 <= py1 <= h and 0 <= px0 <= cx0 < cx1 <= px1 <= w
        # Interior core edges see at least `pad` pixels of context.
        assert cy0 == 0 or cy0 - py0 >= pad
        assert cx0 == 0 or cx0 - px0 >= pad
        assert cy1 == h or py1 - cy1 >= pad
        assert cx1 == w or px1 - cx1 >= pad
        if h % m == 0 and w % m == 0:
            assert all(v % m == 0 for v in (cy0, cy1, cx0, cx1, py0, py1, px0, px1))
    assert (cover == 1).all(), "cores must partition the image"
    assert len(sizes) == 1, f"padded windows differ in size: {sizes}"
    one_tile = not tv.needs_tiled_encode(h, w, tile, pad)
    assert (len(tiles) == 1) == one_tile


def test_layout_matches_reference_counts():
    # PASD_REFERENCE §7.6 defaults on a 4096² image: encoder 4×4 tiles of 1024 (+2·32), decoder on
    # the 512² latent: 3×3 tiles, 490/3 -> 164 rounded up to 192 (+2·11).
    enc = tv.axis_layout(4096, tv.ENCODER_TILE, tv.ENCODER_PAD, 8)
    assert len(enc.cores) == 4 and enc.size == 1088 and enc.cores[0] == (0, 1056)
    dec = tv.axis_layout(512, tv.DECODER_TILE, tv.DECODER_PAD)
    assert len(dec.cores) == 3 and dec.size == 214 and dec.cores == ((0, 203), (203, 395), (395, 512))
    assert tv.best_tile_size(164, 224) == 192 and tv.best_tile_size(200, 224) == 224
    assert tv.best_tile_size(210, 224, 1) == 224 and tv.best_tile_size(230, 240, 8) == 240
    assert tv.best_tile_size(230, 236, 8) == 232 and tv.best_tile_size(13, 15, 1) == 14


def test_thresholds():
    assert not tv.needs_tiled_encode(1088, 1088) and tv.needs_tiled_encode(1096, 64)
    assert not tv.needs_tiled_decode(246, 100) and tv.needs_tiled_decode(100, 247)
    with pytest.raises(ValueError):
        tv.axis_layout(100, 30, 8, 8)  # tile not a multiple of 8


# ---------------------------------------------------------------- numerics

def test_pooled_group_norm_averages_tile_statistics():
    x = jax.random.normal(jax.random.key(0), (3, 5, 7, 8)) * jnp.arange(1, 4)[:, None, None, None] + 0.5
    norm = group_norm(4, 1e-6, pool_batch=True)
    assert isinstance(norm, BatchPooledGroupNorm)
    params = {"scale": jnp.linspace(0.5, 2.0, 8), "bias": jnp.linspace(-1.0, 1.0, 8)}
    got = norm.apply({"params": params}, x)
    xg = np.asarray(x, np.float64).reshape(3, 35, 4, 2)
    mean_t, var_t = xg.mean(axis=(1, 3)), xg.var(axis=(1, 3))  # biased, per tile
    mean, var = mean_t.mean(0)[None, :, None], var_t.mean(0)[None, :, None]
    want = ((xg - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * np.asarray(params["scale"]) \
        + np.asarray(params["bias"])
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    # One sample: exactly the ordinary GroupNorm.
    plain = group_norm(4, 1e-6).apply({"params": params}, x[:1])
    np.testing.assert_allclose(np.asarray(norm.apply({"params": params}, x[:1])), np.asarray(plain), atol=1e-6)


@pytest.fixture(scope="module")
def untiled(vae):
    """Two smooth 256×192 images and the untiled VAE's (mean, logvar, decode(mean))."""
    module, params = vae
    x = _smooth_image(2, 256, 192, seed=2)
    mean, logvar = _encode(module, params, x)
    return x, mean, logvar, _decode(module, params, mean)


def test_one_tile_equals_untiled(vae, untiled):
    module, params = vae
    x, mean, logvar, image = untiled
    # tile ≥ image: one tile per image, run by the VAE with `norm_over_batch=True` on a batch of one
    # and chunked attention (7 and 5 do not divide the 768 tokens); images go one after another.
    assert not tv.needs_tiled_encode(256, 192) and not tv.needs_tiled_decode(32, 24)
    t_mean, t_logvar = _tiled_encode(module, params, x, tv.ENCODER_TILE, tv.ENCODER_PAD, 7)
    assert t_mean.shape == mean.shape == (2, 32, 24, 4)
    np.testing.assert_allclose(t_mean, mean, atol=1e-5 * float(jnp.abs(mean).max()))
    np.testing.assert_allclose(t_logvar, logvar, atol=1e-5 * float(jnp.abs(logvar).max()))
    t_image = _tiled_decode(module, params, mean, tv.DECODER_TILE, tv.DECODER_PAD, 5)
    assert t_image.shape == image.shape == (2, 256, 192, 3)
    np.testing.assert_allclose(t_image, image, atol=1e-5 * float(jnp.abs(image).max()))


def _rel_err(got, want):
    """max |got − want| / max |want|, and the same with the mean absolute error."""
    diff = np.abs(np.asarray(got) - np.asarray(want))
    scale = np.abs(np.asarray(want))
    return diff.max() / scale.max(), diff.mean() / scale.mean()


def _assert_no_zero_seams(img):
    a = np.abs(np.asarray(img)).sum(axis=-1)  # [B, H, W]
    assert np.isfinite(img).all()
    assert (a.max(axis=2) > 0).all() and (a.max(axis=1) > 0).all(), "an output row/column is all zeros"
    assert (a > 0).mean() > 0.99


def test_multi_tile_close_to_untiled(vae, untiled):
    module, params = vae
    x, mean, logvar, image = untiled
    assert len(tv.tile_layout(256, 192, 96, 32, 8)) == 2 * 2
    t_mean, t_logvar = _tiled_encode(module, params, x, 96, 32, 64)
    assert t_mean.shape == t_logvar.shape == mean.shape == (2, 32, 24, 4)

    layout = tv.tile_layout(32, 24, 8, 4)
    assert len(layout) == 3 * 2
    t_image = _tiled_decode(module, params, mean, 8, 4, 50)
    assert t_image.shape == image.shape == (2, 256, 192, 3)
    _assert_no_zero_seams(t_image)

    # Stitching is exact: each core equals its crop of the shared-statistics VAE run on the stacked windows.
    windows = jnp.stack([mean[0, py0:py1, px0:px1] for _, (py0, py1, px0, px1) in layout])
    outs = _decode(module.clone(norm_over_batch=True), params, windows)
    canvas = np.full(image.shape[1:], np.nan, np.float32)
    for k, ((cy0, cy1, cx0, cx1), (py0, _, px0, _)) in enumerate(layout):
        oy, ox = 8 * (cy0 - py0), 8 * (cx0 - px0)
        canvas[8 * cy0:8 * cy1, 8 * cx0:8 * cx1] = outs[k, oy:oy + 8 * (cy1 - cy0), ox:ox + 8 * (cx1 - cx0)]
    np.testing.assert_allclose(t_image[0], canvas, atol=1e-5 * float(jnp.abs(canvas).max()))

    errs = {"mean": _rel_err(t_mean, mean), "logvar": _rel_err(t_logvar, logvar),
            "decode": _rel_err(t_image, image)}
    print("multi-tile vs untiled (max|Δ|/max|ref|, mean|Δ|/mean|ref|): "
          + ", ".join(f"{k} {a:.3f} {b:.3f}" for k, (a, b) in errs.items()))
    # Tiling is not the identity: per-tile attention, averaged variances and `pad` pixels of context,
    # against a random-init VAE whose attention mixes globally and whose receptive field (~80 image px)
    # exceeds the pad. Observed ~0.15-0.25; an unrelated output would be off by ~1 or more.
    for worst, typical in errs.values():
        assert worst < 0.5 and typical < 0.4


class _FixedAffine(nn.Module):
    """Stands in for GroupNorm (same parameters): `0.3·scale·x + bias`, no statistics at all."""

    num_groups: int = 32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        return 0.3 * x * scale + self.param("bias", nn.initializers.zeros, (c,))


def test_tiling_is_exact_without_statistics_when_pad_covers_receptive_field(monkeypatch):
    """Geometry and latent-grid alignment: with norms replaced by a fixed affine map and no attention
    (nothing global left), tiles whose pad exceeds the receptive field reproduce the untiled VAE."""
    fake = lambda groups, eps, **kw: _FixedAffine(groups, eps, name=kw.get("name"))
    monkeypatch.setattr(resnet_lib, "group_norm", fake)
    monkeypatch.setattr(vae_lib, "group_norm", fake)
    config = dict(tiny.tiny_vae_config(), mid_block_add_attention=False)
    module, params = registry.build_module(config), init_params(config, seed=1)
    x = _smooth_image(1, 256, 256, seed=3)
    mean, logvar = _encode(module, params, x)
    assert len(tv.tile_layout(256, 256, 32, 96, 8)) == 4
    t_mean, t_logvar = _tiled_encode(module, params, x, 32, 96)
    np.testing.assert_allclose(t_mean, mean, atol=1e-5 * float(jnp.abs(mean).max()))
    np.testing.assert_allclose(t_logvar, logvar, atol=1e-5 * float(jnp.abs(logvar).max()))
    assert len(tv.tile_layout(32, 32, 4, 12)) == 4
    image = _decode(module, params, mean)
    np.testing.assert_allclose(_tiled_decode(module, params, mean, 4, 12), image,
                               atol=1e-5 * float(jnp.abs(image).max()))


def test_param_paths_unchanged_by_switches(vae):
    module, _ = vae
    shapes = lambda m: {k: (v.shape, v.dtype)
                        for k, v in traverse_util.flatten_dict(registry.abstract_params(m), sep="/").items()}
    base = shapes(module)
    assert shapes(module.clone(norm_over_batch=True, attention_query_chunk=16)) == base
    assert "encoder/mid_block/attentions_0/group_norm/scale" in base and "decoder/conv_norm_out/bias" in base
