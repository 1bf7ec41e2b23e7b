"""`DPMSolverPP` against diffusers `DPMSolverMultistepScheduler` (DPM-Solver++): whole trajectories."""

import numpy as np
import pytest

from pasd_jax.diffusion.dpm_solver import DPMSolverPP
from pasd_jax.models.configs import UnsupportedConfigError
from tests.diffusion import trajectory as tr

torch = pytest.importorskip("torch")
from diffusers import DPMSolverMultistepScheduler  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SM = dict(final_sigmas_type="sigma_min")
CONFIGS = {
    "2m": {},  # DPM-Solver++ 2M, the diffusers default
    "2m_karras": dict(use_karras_sigmas=True),
    "2m_karras_sigma_min": dict(use_karras_sigmas=True, **SM),
    "2m_sigma_min_no_lof": dict(lower_order_final=False, **SM),
    "2m_heun": dict(solver_type="heun"),
    "2m_euler_at_final": dict(euler_at_final=True, **SM),
    "1s": dict(solver_order=1),
    "3m": dict(solver_order=3),
    "3m_sigma_min": dict(solver_order=3, **SM),
    "leading": dict(timestep_spacing="leading"),
    "trailing": dict(timestep_spacing="trailing"),
    "lambda_clipped": dict(lambda_min_clipped=-5.1),
    "v_zero_snr_trailing": dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                timestep_spacing="trailing"),
    "sample_prediction": dict(prediction_type="sample"),
}


@pytest.mark.parametrize("n", tr.STEP_COUNTS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_trajectory_matches_diffusers(name, n):
    cfg = dict(tr.SD15, **CONFIGS[name])
    pred = cfg.get("prediction_type", "epsilon")
    ref, ours = DPMSolverMultistepScheduler.from_config(cfg), DPMSolverPP.from_config(cfg, n)
    x, x0 = tr.start(seed=100 + n)
    ts, want = tr.diffusers_run(ref, n, x, x0, pred)
    np.testing.assert_array_equal(ours.timesteps, ts)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-5, atol=0)  # see unipc_test
    tr.assert_trajectories_close(tr.jax_run(ours, x, x0, pred), want)


@pytest.mark.parametrize("bad", [dict(algorithm_type="sde-dpmsolver++"), dict(algorithm_type="dpmsolver", **SM),
                                 dict(use_lu_lambdas=True), dict(thresholding=True),
                                 dict(variance_type="learned_range")])
def test_unsupported_options_refused(bad):
    with pytest.raises(UnsupportedConfigError):
        DPMSolverPP.from_config(dict(tr.SD15, **bad), 6)
