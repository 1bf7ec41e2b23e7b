"""The scan interface: the DDIM adapter against `ddim_step` and diffusers, and `make_scheduler`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pasd_jax.diffusion import DDIMArrays, NoiseSchedule, ddim_step, ddim_timesteps
from pasd_jax.diffusion.schedulers import DDIM, make_scheduler, scheduler_class_name
from pasd_jax.models.configs import UnsupportedConfigError
from tests.diffusion import trajectory as tr

torch = pytest.importorskip("torch")
import diffusers as diffusers_mod  # noqa: E402
from diffusers import DDIMScheduler  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
PASD_SD15 = dict(tr.SD15, set_alpha_to_one=False, clip_sample=False)  # SD1.5's scheduler_config.json


@pytest.mark.parametrize("n", [1, 6, 20])
def test_ddim_adapter_matches_diffusers(n):
    x, x0 = tr.start(seed=7)
    ts, want = tr.diffusers_run(DDIMScheduler.from_config(PASD_SD15), n, x, x0, "epsilon")
    ours = make_scheduler("ddim", PASD_SD15, n)
    np.testing.assert_array_equal(ours.timesteps, ts)
    tr.assert_trajectories_close(tr.jax_run(ours, x, x0, "epsilon"), want)


def test_ddim_adapter_is_bitwise_ddim_step():
    """Indexing the tables with the scan's step index gives exactly the old (t, prev_t)-scan result."""
    sched = NoiseSchedule.from_config(PASD_SD15)
    ts, prev = ddim_timesteps(sched, 20)
    arrays, adapter = DDIMArrays.from_schedule(sched), DDIM.from_schedule(sched, 20, eta=0.5)
    x = jnp.asarray(tr.start()[0])
    noises = jax.random.normal(jax.random.key(0), (20,) + x.shape)

    @jax.jit
    def old(x):
        def body(s, xs):
            t, p, z = xs
            s = ddim_step(arrays, 0.1 * s + 0.01 * t, t, p, s, eta=0.5, variance_noise=z,
                          prediction_type=sched.prediction_type, clip_sample=sched.clip_sample)
            return s, s
        return jax.lax.scan(body, x, (jnp.asarray(ts), jnp.asarray(prev), noises))[1]

    @jax.jit
    def new(x):
        def body(state, xs):
            i, z = xs
            t = jnp.take(jnp.asarray(adapter.timesteps), i)
            return adapter.step(state, 0.1 * state.sample + 0.01 * t, i, z)
        return jax.lax.scan(body, adapter.init_state(x), (jnp.arange(20), noises))[1]

    np.testing.assert_array_equal(np.asarray(old(x)), np.asarray(new(x)))


def test_make_scheduler_names_and_overrides():
    assert scheduler_class_name("unipc") == "UniPCMultistepScheduler"
    assert scheduler_class_name("LCMScheduler") == "LCMScheduler"
    # a PNDM config (SD1.5's) feeds any class, as diffusers' from_config does
    pndm = dict(PASD_SD15, _class_name="PNDMScheduler", skip_prk_steps=True)
    assert make_scheduler("unipc", pndm, 20).timesteps[0] == 999
    dpm = make_scheduler("dpmpp_2m", dict(pndm, solver_order=3), 20)
    assert dpm.solver_order == 2  # "2M" whatever the file says
    assert make_scheduler("DPMSolverMultistepScheduler", dict(pndm, solver_order=3), 20).solver_order == 3
    assert make_scheduler("lcm", pndm, 4).timesteps.tolist() == [999, 759, 499, 259]
    with pytest.raises(UnsupportedConfigError, match="euler"):
        scheduler_class_name("euler")
    with pytest.raises(ValueError, match="eta"):
        make_scheduler("unipc", pndm, 20, eta=0.5)


@pytest.mark.parametrize("cls", ["UniPCMultistepScheduler", "DPMSolverMultistepScheduler", "LCMScheduler",
                                 "DDIMScheduler"])
def test_add_noise_matches_diffusers(cls):
    """Each class's own `add_noise`, including the UniPC / DPM fallback for a t outside the schedule
    (900 with 20 steps -> the last step's σ, PASD_REFERENCE §7.4) that the reference's ANS hits."""
    ref = getattr(diffusers_mod, cls).from_config(PASD_SD15)
    n = 4 if cls == "LCMScheduler" else 20
    ref.set_timesteps(n)
    ours = make_scheduler(cls, PASD_SD15, n)
    x, noise = tr.start(seed=11)
    for t in (int(ref.timesteps[0]), 900, int(ref.timesteps[2])):
        want = ref.add_noise(torch.from_numpy(x), torch.from_numpy(noise), torch.tensor([t])).numpy()
        got = np.asarray(jax.jit(ours.add_noise)(x, noise, t))
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    if cls in ("UniPCMultistepScheduler", "DPMSolverMultistepScheduler"):  # 900 really fell back
        last = ref.add_noise(torch.from_numpy(x), torch.from_numpy(noise), ref.timesteps[-1:]).numpy()
        np.testing.assert_allclose(np.asarray(ours.add_noise(x, noise, 900)), last, rtol=0, atol=2e-6)
