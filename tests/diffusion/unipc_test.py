"""`UniPC` against diffusers `UniPCMultistepScheduler`: whole trajectories over a grid of configs × N."""

import numpy as np
import pytest

from pasd_jax.diffusion.unipc import UniPC
from pasd_jax.models.configs import UnsupportedConfigError
from tests.diffusion import trajectory as tr

torch = pytest.importorskip("torch")
from diffusers import UniPCMultistepScheduler  # noqa: E402

SM = dict(final_sigmas_type="sigma_min")
CONFIGS = {
    "pasd_default": {},  # the reference's test_pasd.py scheduler (SD1.5 betas, UniPC defaults)
    "order1": dict(solver_order=1),
    "order3": dict(solver_order=3),
    "order3_no_lof": dict(solver_order=3, lower_order_final=False, **SM),
    "order2_no_lof": dict(lower_order_final=False, **SM),
    "sigma_min": SM,
    "bh1": dict(solver_type="bh1", **SM),
    "bh1_order3": dict(solver_type="bh1", solver_order=3, **SM),
    "predict_eps": dict(predict_x0=False, **SM),
    "predict_eps_bh1_order3": dict(predict_x0=False, solver_type="bh1", solver_order=3, **SM),
    "leading": dict(timestep_spacing="leading"),
    "trailing": dict(timestep_spacing="trailing"),
    "karras": dict(use_karras_sigmas=True),
    "karras_sigma_min_order3": dict(use_karras_sigmas=True, solver_order=3, **SM),
    "karras_bounds": dict(use_karras_sigmas=True, sigma_min=0.05, sigma_max=10.0),
    "v_prediction": dict(prediction_type="v_prediction"),
    "v_zero_snr_trailing": dict(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                timestep_spacing="trailing"),
    "sample_prediction": dict(prediction_type="sample"),
    "disable_corrector": dict(disable_corrector=[0, 1, 4]),
    "linear_betas": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, steps_offset=0),
}


def _pair(name, n):
    cfg = dict(tr.SD15, **CONFIGS[name])
    return UniPCMultistepScheduler.from_config(cfg), UniPC.from_config(cfg, n), cfg.get("prediction_type", "epsilon")


@pytest.mark.parametrize("n", tr.STEP_COUNTS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_trajectory_matches_diffusers(name, n):
    ref, ours, pred = _pair(name, n)
    x, x0 = tr.start(seed=n)
    ts, want = tr.diffusers_run(ref, n, x, x0, pred)
    np.testing.assert_array_equal(ours.timesteps, ts)
    # σ tables agree to float32 rounding: torch's CPU float32 sqrt is not correctly rounded (1 ulp off for
    # ~20% of the entries), and 1 − ᾱ near t = 0 amplifies an ulp of ᾱ (most after a zero-SNR rescale)
    np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=1e-5, atol=0)
    tr.assert_trajectories_close(tr.jax_run(ours, x, x0, pred), want)


def test_reference_timesteps():
    """PASD_REFERENCE §7.1: test_pasd.py's 20 UniPC timesteps."""
    ours = UniPC.from_config(tr.SD15, 20)
    assert ours.timesteps.tolist() == [999, 949, 899, 849, 799, 749, 699, 649, 599, 549,
                                       500, 450, 400, 350, 300, 250, 200, 150, 100, 50]


@pytest.mark.parametrize("bad", [dict(solver_type="bh1"), dict(lower_order_final=False),
                                 dict(predict_x0=False)])
def test_non_finite_configs_refused_where_diffusers_blows_up(bad):
    """With a final σ of 0 these configs give NaN/inf in diffusers; we refuse them with a clear error."""
    cfg = dict(tr.SD15, **bad)
    x, x0 = tr.start()
    _, want = tr.diffusers_run(UniPCMultistepScheduler.from_config(cfg), 6, x, x0, "epsilon")
    assert not np.all(np.isfinite(want[-1]))
    with pytest.raises(UnsupportedConfigError, match="non-finite"):
        UniPC.from_config(cfg, 6)


@pytest.mark.parametrize("bad", [dict(thresholding=True), dict(use_exponential_sigmas=True),
                                 dict(prediction_type="flow_prediction"), dict(solver_type="foo")])
def test_unsupported_options_refused(bad):
    with pytest.raises(UnsupportedConfigError):
        UniPC.from_config(dict(tr.SD15, **bad), 6)


def test_unknown_override_is_an_error():
    with pytest.raises(TypeError, match="solver_ordr"):
        UniPC.from_config(tr.SD15, 6, solver_ordr=3)
