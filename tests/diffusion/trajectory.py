"""Shared oracle harness for the scheduler tests: one fake model, run through diffusers and through us.

The fake model is a deterministic function of the sample and the timestep — a denoiser aiming at
a fixed target x0* plus a sample- and t-dependent error — so a scheduler's errors feed back into
the next model output as they would with a real network. Its t-dependent scalars are computed
once per timestep on the host (float32) and fed to both sides, so the two runs differ only by the
schedulers' arithmetic (and float32 `tanh`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch

SHAPE = (1, 4, 4, 4)
SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
STEP_COUNTS = (1, 2, 3, 6, 20, 50)


def start(seed: int = 0):
    """(x_T, x0*) float32 of `SHAPE`."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(SHAPE).astype(np.float32), (1.5 * rng.standard_normal(SHAPE)).astype(np.float32)


def model_table(alphas_cumprod, timesteps) -> np.ndarray:
    """Per-step float32 `[N, 3]`: sqrt(ᾱ_t), sqrt(1 − ᾱ_t), 0.3·cos(t/97)."""
    ab = np.asarray(alphas_cumprod, np.float64)[np.asarray(timesteps)]
    c = 0.3 * np.cos(np.asarray(timesteps, np.float64) / 97.0)
    return np.stack([np.sqrt(ab), np.sqrt(1 - ab), c], -1).astype(np.float32)


def fake_model(x, row, x0, prediction_type, xp):
    """ε = (x − sqrt ᾱ x0*)/sqrt(1−ᾱ) + c·tanh(x); x̂0 = x0* + c·tanh(x); v = sqrt ᾱ ε − sqrt(1−ᾱ) x̂0."""
    sa, sb, c = row[0], row[1], row[2]
    err = c * xp.tanh(x)
    eps = (x - sa * x0) / sb + err
    if prediction_type == "epsilon":
        return eps
    x0_hat = x0 + err
    if prediction_type == "sample":
        return x0_hat
    return sa * eps - sb * x0_hat


def diffusers_run(sched, n, x, x0, prediction_type):
    """(timesteps, trajectory `[n, …]`) of a diffusers scheduler (already configured) with the fake model.

    Schedulers that draw noise inside `step` (LCM) get theirs from `fixed_randn` patched in.
    """
    sched.set_timesteps(n)
    table = model_table(sched.alphas_cumprod.numpy(), sched.timesteps.numpy())
    sample, x0t, traj = torch.from_numpy(x), torch.from_numpy(x0), []
    for i, t in enumerate(sched.timesteps):
        out = fake_model(sample, torch.from_numpy(table[i]), x0t, prediction_type, torch)
        sample = sched.step(out, t, sample).prev_sample
        traj.append(sample.numpy().copy())
    return sched.timesteps.numpy(), np.stack(traj)


def fixed_randn(monkeypatch, module, noises):
    """Make `module.randn_tensor` return `noises[0]`, `noises[1]`, … on successive calls."""
    queue = [torch.from_numpy(np.asarray(z, np.float32)) for z in noises]

    def randn(shape, **kw):
        return queue.pop(0).reshape(shape).clone()

    monkeypatch.setattr(module, "randn_tensor", randn)


PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


@jax.jit
def _scan(sched, x, x0, table, noises, select):
    """The fake model of every prediction type, one selected by the one-hot `select` (1·a + 0·b + 0·c = a
    exactly), so one program serves all prediction types."""

    def body(state, xs):
        i, row, noise = xs
        outs = [fake_model(state.sample, row, x0, p, jnp) for p in PREDICTION_TYPES]
        out = select[0] * outs[0] + select[1] * outs[1] + select[2] * outs[2]
        state, sample = sched.step(state, out, i, noise if sched.needs_noise else None)
        return state, sample

    steps = jnp.arange(sched.num_steps, dtype=jnp.int32)
    return jax.lax.scan(body, sched.init_state(x), (steps, table, noises))[1]


def jax_run(sched, x, x0, prediction_type, noises=None):
    """Trajectory `[n, …]` of our scheduler in one jitted `lax.scan`. The tables are jit arguments, so the
    program is compiled once per (scheduler treedef, N) and shared by all configs of that shape."""
    table = model_table(sched.alphas_cumprod, sched.timesteps)
    if noises is None:
        noises = np.zeros((sched.num_steps,) + x.shape, np.float32)
    select = np.eye(3, dtype=np.float32)[PREDICTION_TYPES.index(prediction_type)]
    return np.asarray(_scan(sched, jnp.asarray(x), jnp.asarray(x0), jnp.asarray(table), jnp.asarray(noises),
                            jnp.asarray(select)))


def assert_trajectories_close(got, want, rel=1e-5):
    """Every step: max |got − want| ≤ rel · max(1, max |want|) (relative to the sample's scale)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.all(np.isfinite(want)), "oracle trajectory is not finite"
    for i in range(want.shape[0]):
        scale = max(1.0, float(np.max(np.abs(want[i]))))
        err = float(np.max(np.abs(got[i] - want[i])))
        assert err <= rel * scale, f"step {i}: max error {err:.3g} > {rel:g} × scale {scale:.3g}"
