"""`ddim_step` against diffusers `DDIMScheduler.step`: whole trajectories, traced timesteps, lax.scan."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pasd_jax.diffusion import DDIMArrays, NoiseSchedule, ddim_step, ddim_timesteps, prev_timestep

torch = pytest.importorskip("torch")
from diffusers import DDIMScheduler  # noqa: E402

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
SHAPE = (2, 4, 8, 8)
STEPS = 20


def _fake_run(n, seed=0):
    """Initial sample, a target x0* (|x0*| often > 1, so clipping bites), per-step randoms and noise."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(SHAPE, np.float32)
    x0 = 1.5 * rng.standard_normal(SHAPE)
    rand = rng.standard_normal((n,) + SHAPE)
    noises = rng.standard_normal((n,) + SHAPE, np.float32)
    return x, x0, rand, noises


def _fake_model(prediction_type, abar, sample, x0, rand):
    """A pseudo-denoiser aiming at x0* with 30% error, in float64 (keeps |x| ~ 1 like a real model).

    Pure random ε would make x̂0 = (x − sqrt(1−ᾱ)ε)/sqrt(ᾱ) grow ~10× per early step, which says
    nothing about the scheduler (see `test_raw_random_outputs`).
    """
    eps = (sample - np.sqrt(abar) * x0) / np.sqrt(1 - abar) + 0.3 * rand
    x0_hat = x0 + 0.3 * rand
    out = {"epsilon": eps, "sample": x0_hat, "v_prediction": np.sqrt(abar) * eps - np.sqrt(1 - abar) * x0_hat}
    return out[prediction_type].astype(np.float32)


def _diffusers_trajectory(cfg, n, eta, x, x0, rand, noises, raw=False):
    """Run `DDIMScheduler.step` with the fake model; returns (timesteps, model outputs, samples).

    The model outputs are recorded, so our implementation replays the *same* fixed output sequence.
    """
    ref = DDIMScheduler.from_config(cfg)
    ref.set_timesteps(n)
    sample, outs, traj = torch.from_numpy(x), [], []
    for i, t in enumerate(ref.timesteps):
        abar = float(ref.alphas_cumprod[t])
        if raw:
            out = rand[i].astype(np.float32)
        else:
            out = _fake_model(ref.config.prediction_type, abar, sample.numpy(), x0, rand[i])
        kw = dict(variance_noise=torch.from_numpy(noises[i])) if eta > 0 else {}
        sample = ref.step(torch.from_numpy(out), t, sample, eta=eta, **kw).prev_sample
        outs.append(out)
        traj.append(sample.numpy())
    return ref.timesteps.numpy(), np.stack(outs), np.stack(traj)


def _step_fn(sched, eta):
    return jax.jit(
        functools.partial(
            ddim_step,
            eta=eta,
            prediction_type=sched.prediction_type,
            clip_sample=sched.clip_sample,
            clip_sample_range=sched.clip_sample_range,
        )
    )


@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_trajectory_matches_diffusers(prediction_type, eta, set_alpha_to_one, clip_sample):
    cfg = dict(SD15, prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one, clip_sample=clip_sample)
    x, x0, rand, noises = _fake_run(STEPS)
    ref_ts, outs, want = _diffusers_trajectory(cfg, STEPS, eta, x, x0, rand, noises)

    sched = NoiseSchedule.from_config(cfg)
    ts, prev_ts = ddim_timesteps(sched, STEPS)
    np.testing.assert_array_equal(ts, ref_ts)
    assert ts[0] == 951 and prev_ts[-1] < 0  # last step reads final_alpha_cumprod
    step, arrays, sample = _step_fn(sched, eta), DDIMArrays.from_schedule(sched), jnp.asarray(x)
    for i in range(STEPS):
        noise = jnp.asarray(noises[i]) if eta > 0 else None
        sample = step(arrays, jnp.asarray(outs[i]), ts[i], prev_ts[i], sample, variance_noise=noise)
        err = float(np.max(np.abs(np.asarray(sample) - want[i])))
        assert err <= 1e-5, (i, int(ts[i]), err)


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_other_spacings_use_t_minus_T_over_N(spacing):
    """diffusers steps to `t − T//N` whatever the spacing; so do we."""
    cfg = dict(SD15, timestep_spacing=spacing, prediction_type="v_prediction", clip_sample=False)
    x, x0, rand, noises = _fake_run(STEPS, seed=1)
    _, outs, want = _diffusers_trajectory(cfg, STEPS, 0.0, x, x0, rand, noises)
    sched = NoiseSchedule.from_config(cfg)
    ts = sched.timesteps(STEPS)
    step, sample = _step_fn(sched, 0.0), jnp.asarray(x)
    for i, t in enumerate(ts):
        sample = step(sched, jnp.asarray(outs[i]), t, prev_timestep(t, 1000, STEPS), sample)
    assert float(np.max(np.abs(np.asarray(sample) - want[-1]))) <= 1e-5


def test_scan_matches_loop_and_diffusers():
    """Traced int timesteps inside jit + lax.scan (the sampler's shape), eta > 0 with supplied noise."""
    cfg = dict(SD15, clip_sample=False, set_alpha_to_one=False)
    sched = NoiseSchedule.from_config(cfg)
    x, x0, rand, noises = _fake_run(STEPS, seed=2)
    _, outs, want = _diffusers_trajectory(cfg, STEPS, 0.5, x, x0, rand, noises)
    ts, prev_ts = ddim_timesteps(sched, STEPS)

    @jax.jit
    def run(arrays, x, xs):
        def body(sample, inp):
            t, prev_t, out, noise = inp
            sample = ddim_step(arrays, out, t, prev_t, sample, eta=0.5, variance_noise=noise)
            return sample, sample

        return jax.lax.scan(body, x, xs)

    final, traj = run(DDIMArrays.from_schedule(sched), jnp.asarray(x), (ts, prev_ts, outs, noises))
    assert float(np.max(np.abs(np.asarray(traj) - want))) <= 1e-5
    np.testing.assert_array_equal(np.asarray(final), np.asarray(traj[-1]))


def test_raw_random_outputs():
    """Unstructured random ε blows |x| up to ~20; there we agree to 1e-6 relative (few float32 ulp;
    torch's CPU float32 sqrt is itself not correctly rounded)."""
    cfg = dict(SD15, clip_sample=False)
    x, x0, rand, noises = _fake_run(STEPS, seed=4)
    ts, outs, want = _diffusers_trajectory(cfg, STEPS, 0.5, x, x0, rand, noises, raw=True)
    sched = NoiseSchedule.from_config(cfg)
    step, sample = _step_fn(sched, 0.5), jnp.asarray(x)
    for i, t in enumerate(ts):
        sample = step(sched, outs[i], t, prev_timestep(t, 1000, STEPS), sample, variance_noise=noises[i])
    scale = float(np.max(np.abs(want[-1])))
    assert scale > 5 and float(np.max(np.abs(np.asarray(sample) - want[-1]))) <= 1e-6 * scale


def test_per_example_timesteps_and_x0():
    """`[B]` timesteps broadcast per example; `return_x0` gives diffusers' pred_original_sample."""
    sched = NoiseSchedule.from_config(dict(SD15, clip_sample=False))
    ref = DDIMScheduler.from_config(dict(SD15, clip_sample=False))
    ref.set_timesteps(STEPS)
    x, _, rand, _ = _fake_run(1, seed=3)
    outs = rand.astype(np.float32)
    t = np.array([951, 451])
    got, x0 = ddim_step(sched, outs[0], t, prev_timestep(t, 1000, STEPS), x, return_x0=True)
    for b in range(2):
        o = ref.step(torch.from_numpy(outs[0][b : b + 1]), int(t[b]), torch.from_numpy(x[b : b + 1]))
        np.testing.assert_allclose(np.asarray(got[b : b + 1]), o.prev_sample.numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(x0[b : b + 1]), o.pred_original_sample.numpy(), rtol=0, atol=1e-5)


def test_eta_without_noise_raises():
    sched = NoiseSchedule.from_config(SD15)
    with pytest.raises(ValueError, match="variance_noise"):
        ddim_step(sched, jnp.zeros(SHAPE), 951, 901, jnp.zeros(SHAPE), eta=0.5)
