"""`LCM` against diffusers `LCMScheduler`: whole trajectories with the same per-step noise."""

import numpy as np
import pytest

from pasd_jax.diffusion.lcm import LCM, lcm_timesteps
from tests.diffusion import trajectory as tr

torch = pytest.importorskip("torch")
import diffusers.schedulers.scheduling_lcm as lcm_module  # noqa: E402
from diffusers import LCMScheduler  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CONFIGS = {
    "lcm_lora_sd15": dict(set_alpha_to_one=True),  # the LCM-LoRA SD1.5 scheduler config
    "alpha_not_one": dict(set_alpha_to_one=False),
    "v_prediction": dict(prediction_type="v_prediction"),
    "sample_clip": dict(prediction_type="sample", clip_sample=True, clip_sample_range=1.2),
    "scaling_5": dict(timestep_scaling=5.0),
    "zero_snr": dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"),
}


@pytest.mark.parametrize("n", tr.STEP_COUNTS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_trajectory_matches_diffusers(name, n, monkeypatch):
    cfg = dict(tr.SD15, **CONFIGS[name])
    pred = cfg.get("prediction_type", "epsilon")
    ref, ours = LCMScheduler.from_config(cfg), LCM.from_config(cfg, n)
    x, x0 = tr.start(seed=200 + n)
    noises = np.random.default_rng(n).standard_normal((n,) + x.shape).astype(np.float32)
    tr.fixed_randn(monkeypatch, lcm_module, noises[:-1])  # diffusers draws no noise at the last step
    ts, want = tr.diffusers_run(ref, n, x, x0, pred)
    np.testing.assert_array_equal(ours.timesteps, ts)
    tr.assert_trajectories_close(tr.jax_run(ours, x, x0, pred, noises=noises), want)


def test_four_step_timesteps():
    """The LCM-LoRA 4-step schedule."""
    assert lcm_timesteps(1000, 50, 4).tolist() == [999, 759, 499, 259]


def test_too_many_steps_refused():
    with pytest.raises(ValueError, match="original_inference_steps"):
        LCM.from_config({}, 51)


def test_step_needs_noise():
    sched = LCM.from_config({}, 4)
    with pytest.raises(ValueError, match="noise"):
        sched.step(sched.init_state(np.zeros(tr.SHAPE, np.float32)), np.zeros(tr.SHAPE, np.float32), 0)
