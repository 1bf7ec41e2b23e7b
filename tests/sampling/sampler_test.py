"""The compiled sampler on the tiny smoke model: one trace per shape, scan = loop, ANS closed form,
tiled noise prediction = the numpy blending oracle, CFG shortcut, seeds."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
import numpy as np
import pytest

from pasd_jax.assembly.loader import load_models
from pasd_jax.fixtures import tiny
from pasd_jax.imaging import tiling
from pasd_jax.sampling.sampler import Noises, Sampler, SamplerSettings, ans_init, latent_shape, make_inputs

STEPS = 2


pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "pasd"
    tiny.make_tiny_pipeline(folder, seed=0, levels=2)  # 2× latents, fast to compile
    m = load_models(folder)
    # give the zero convs weights so the ControlNet really steers the UNet in these tests
    cn = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.05 if "controlnet_down_blocks" in jax.tree_util.keystr(path) else x,
        m.params["controlnet"])
    return dataclasses.replace(m, params={**m.params, "controlnet": cn})


def _inputs(models, seed=0, size=(16, 24), guidance=True, guidance_scale=7.5, level=900):
    rng = np.random.default_rng(seed)
    lq = rng.random((1,) + size + (3,), dtype=np.float32)
    text = rng.standard_normal((2 if guidance else 1, 77, 32)).astype(np.float32)
    noises = Noises.draw(jax.random.key(seed), latent_shape(models, lq.shape))
    return make_inputs(lq, text, noises, guidance_scale=guidance_scale, added_noise_level=level)


@pytest.fixture(scope="module")
def sampler(models):
    return Sampler(models, SamplerSettings(num_steps=STEPS, trajectory=True))


def test_compiled_once_per_shape_and_scan_equals_loop(models, sampler):
    a = sampler(_inputs(models, seed=0))
    b = sampler(_inputs(models, seed=1, guidance_scale=3.0, level=500))  # new values, same shapes
    assert sampler.trace_count == 1
    assert not np.allclose(a["image"], b["image"])
    loop = sampler.run_loop(_inputs(models, seed=0))
    for name in ("init_latents", "trajectory", "final_latents", "decoded", "image"):
        np.testing.assert_allclose(loop[name], a[name], atol=1e-5, rtol=1e-5, err_msg=name)
    assert a["trajectory"].shape == (STEPS, 1, 8, 12, 4) and a["image"].shape == (1, 16, 24, 3)
    assert float(a["image"].min()) >= 0.0 and float(a["image"].max()) <= 1.0
    sampler(_inputs(models, seed=0, size=(16, 16)))
    assert sampler.trace_count == 2


def test_same_seed_same_result(models, sampler):
    a, b = sampler(_inputs(models, seed=4)), sampler(_inputs(models, seed=4))
    np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))


def test_ans_closed_form_matches_two_add_noise_calls(models, sampler):
    sched = models.schedule
    rng = np.random.default_rng(0)
    z0, e2, e3 = (jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32) for _ in range(3))
    t0 = int(sampler.timesteps[0])
    want = sched.add_noise(sched.add_noise(z0, e2, t0), e3, 900)
    got = ans_init(sampler.scheduler, z0, e2, e3, t0, 900)
    np.testing.assert_allclose(got, want, atol=2e-6)
    off = ans_init(sampler.scheduler, z0, e2, e3, t0, 0)  # level 0: ANS off
    np.testing.assert_allclose(off, sched.add_noise(z0, e2, t0), atol=2e-6)
    # the signal coefficient of §7.4: sqrt(ᾱ_900 · ᾱ_t0)
    coef = np.sqrt(sched.alphas_cumprod[900] * sched.alphas_cumprod[t0])
    np.testing.assert_allclose(ans_init(sampler.scheduler, z0, 0 * e2, 0 * e3, t0, 900), coef * z0, rtol=1e-5)


def _full_eps(models, p, x, t, text, cond, cond_scale):
    """ControlNet with its DR net on the LQ crop `cond` (no hoisting) + UNet: the reference call."""
    tb = jnp.broadcast_to(t, (x.shape[0],))
    _, down, mid = models.controlnet.apply({"params": p["controlnet"]}, x, tb, text, cond,
                                           conditioning_scale=cond_scale)
    return models.unet.apply({"params": p["unet"]}, x, tb, text, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid)


def test_tiled_prediction_matches_numpy_blend_oracle(models):
    settings = SamplerSettings(num_steps=STEPS, tile_size=6, tile_overlap=2, tiles_per_call=2)
    s = Sampler(models, settings)
    inp = _inputs(models, seed=2)
    x = jnp.concatenate([inp.noises.first_timestep] * 2)
    cond = jnp.concatenate([inp.lq] * 2)
    t, p = jnp.int32(501), models.params
    features = jax.jit(s.condition)(p, cond)  # the DR net once per tile crop, [groups, per call, 2, T, T, C0]
    assert features.shape[:3] == (3, 2, 2)
    got = jax.jit(s._tiled_eps)(p, x, t, inp.text, features, inp.conditioning_scale)
    origins = tiling.tile_origins(8, 12, 6, 2)
    assert len(origins) == 6  # 2 rows × 3 columns, one padded group with tiles_per_call=2 → 3 calls
    eps = jax.jit(lambda *a: _full_eps(models, *a))
    d = models.latent_downscale
    tiles = [eps(p, x[:, y:y + 6, x0:x0 + 6], t, inp.text, cond[:, d * y:d * (y + 6), d * x0:d * (x0 + 6)],
                 inp.conditioning_scale) for y, x0 in origins]
    want = tiling.blend(np.stack(tiles), origins, tiling.gaussian_weights(6, 6), 8, 12)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    # one tile covering the latent gives the untiled prediction
    whole = Sampler(models, dataclasses.replace(settings, tile_size=12, tile_overlap=0))
    sq = jnp.concatenate([x[:, :, :8], x[:, :, :8]])[:2]
    sq_cond = cond[:, :, :8 * d]
    got1 = jax.jit(whole._tiled_eps)(p, sq, t, inp.text, jax.jit(whole.condition)(p, sq_cond)[None, None],
                                     inp.conditioning_scale)
    want1 = jax.jit(lambda *a: _full_eps(models, *a))(p, sq, t, inp.text, sq_cond, inp.conditioning_scale)
    np.testing.assert_allclose(got1, want1, atol=1e-5)


def test_dr_net_feature_computed_once_equals_per_call(models):
    """Hoisting the DR net out of the steps and the CFG pair changes nothing: the sampler's noise
    prediction equals the ControlNet run on the LQ image itself at every call."""
    s = Sampler(models, SamplerSettings(num_steps=STEPS))
    inp = _inputs(models, seed=6)
    t, p = jnp.int32(701), models.params
    latents = inp.noises.first_timestep
    got = jax.jit(s.guided_eps)(p, latents, t, inp)  # computes the feature itself (cond_feature None)
    hoisted = inp._replace(cond_feature=jax.jit(s.condition)(p, inp.lq))
    np.testing.assert_array_equal(jax.jit(s.guided_eps)(p, latents, t, hoisted), got)
    text = jnp.concatenate([inp.text[:1], inp.text[1:]])  # [neg; pos]
    both = _full_eps(models, p, jnp.concatenate([latents] * 2), t, text, jnp.concatenate([inp.lq] * 2),
                     inp.conditioning_scale)
    want = both[:1] + inp.guidance_scale * (both[1:] - both[:1])
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="controlnet_cond or cond_feature"):
        models.controlnet.apply({"params": p["controlnet"]}, latents, jnp.zeros((1,), jnp.int32), inp.text[:1], None)


def _conv_inputs(jaxpr, inside_scan=False):
    """(lhs shape, inside a scan?) of every convolution in a closed jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            found.append((tuple(eqn.invars[0].aval.shape), inside_scan))
        for sub in jax_core.jaxprs_in_params(eqn.params):
            found += _conv_inputs(sub, inside_scan or eqn.primitive.name == "scan")
    return found


def test_dr_net_runs_before_the_scan_not_in_it(models, sampler):
    """No convolution at the LQ image's resolution inside the denoising scan: the DR net (the
    only network at 8× the latent size) runs once per run, on the B images (not the 2B CFG batch)."""
    inp = _inputs(models, seed=0)
    jaxpr = jax.make_jaxpr(sampler._sample_traced)(models.params, inp).jaxpr
    at_image = [(shape, in_scan) for shape, in_scan in _conv_inputs(jaxpr) if shape[1:3] == inp.lq.shape[1:3]]
    assert at_image and not any(in_scan for _, in_scan in at_image)
    assert {shape[0] for shape, _ in at_image} == {inp.lq.shape[0]}
    assert any(in_scan for _, in_scan in _conv_inputs(jaxpr))  # the networks themselves are in the scan


def test_guidance_off_equals_scale_one(models):
    on = Sampler(models, SamplerSettings(num_steps=STEPS))
    off = Sampler(models, SamplerSettings(num_steps=STEPS, guidance=False))
    inp = _inputs(models, seed=3, guidance_scale=1.0)
    single = inp._replace(text=inp.text[1:])
    np.testing.assert_allclose(off(single)["final_latents"], on(inp)["final_latents"], atol=1e-4)


def test_pure_noise_init_and_eta(models):
    s = Sampler(models, SamplerSettings(num_steps=STEPS, init="noise", eta=1.0))
    inp = _inputs(models, seed=5)
    out = s(inp)
    assert "vae_latent_z0" not in out
    np.testing.assert_array_equal(out["init_latents"], inp.noises.first_timestep)
    other = s(inp._replace(noises=inp.noises._replace(step_key=jax.random.key(9))))
    assert not np.allclose(out["final_latents"], other["final_latents"])  # η > 0 draws step noise


def test_settings_are_validated():
    with pytest.raises(ValueError, match="init"):
        SamplerSettings(init="zeros")
    with pytest.raises(ValueError, match="vae_tiling"):
        SamplerSettings(vae_tiling="sometimes")
