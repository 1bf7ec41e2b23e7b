"""`NoiseSchedule` against diffusers `DDIMScheduler`: tables, inference timesteps, q(x_t|x_0), v-target."""

import json

import numpy as np
import pytest

from pasd_jax.diffusion import NoiseSchedule, load_scheduler_config
from pasd_jax.models.configs import UnsupportedConfigError

torch = pytest.importorskip("torch")
from diffusers import DDIMScheduler  # noqa: E402

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)

CONFIGS = {
    "sd15_scaled_linear": dict(SD15, set_alpha_to_one=False, steps_offset=1, clip_sample=False),
    "scaled_linear_zero_snr": dict(SD15, rescale_betas_zero_snr=True),
    "linear_default": dict(),
    "linear_sd": dict(SD15, beta_schedule="linear"),
    "linear_zero_snr": dict(rescale_betas_zero_snr=True),
    "squaredcos": dict(beta_schedule="squaredcos_cap_v2"),
    "squaredcos_zero_snr": dict(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True),
    "trained_betas": dict(trained_betas=list(np.linspace(1e-4, 2e-2, 50)), num_train_timesteps=50),
    "short_scaled_linear": dict(SD15, num_train_timesteps=37),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tables_match_diffusers(name):
    cfg = CONFIGS[name]
    ours, ref = NoiseSchedule.from_config(cfg), DDIMScheduler.from_config(cfg)
    # Bit-equal on the CPUs we tested (torch's fma linspace, float64-accumulated cumprod). The zero-SNR
    # rescale goes through torch's float32 `sqrt`, which on CPU is not correctly rounded (~20% of values
    # are 1 ulp off numpy's), so those tables agree to a few float32 ulp instead.
    zero_snr = cfg.get("rescale_betas_zero_snr", False)
    tol = {"betas": 5e-6, "alphas_cumprod": 5e-7} if zero_snr else {"betas": 1e-7, "alphas_cumprod": 1e-7}
    for field in ("betas", "alphas_cumprod"):
        got, want = getattr(ours, field), getattr(ref, field).numpy()
        assert got.dtype == want.dtype == np.float32
        assert np.max(np.abs(got.astype(np.float64) - want)) <= tol[field], field
    assert ours.final_alpha_cumprod == np.float32(ref.final_alpha_cumprod)


def test_sd15_tables_bit_equal():
    cfg = CONFIGS["sd15_scaled_linear"]
    ours, ref = NoiseSchedule.from_config(cfg), DDIMScheduler.from_config(cfg)
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 4, 20, 50])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_match_set_timesteps(spacing, steps, offset):
    cfg = dict(SD15, timestep_spacing=spacing, steps_offset=offset)
    ref = DDIMScheduler.from_config(cfg)
    ref.set_timesteps(steps)
    got = NoiseSchedule.from_config(cfg).timesteps(steps)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, ref.timesteps.numpy())


def test_timesteps_too_many():
    with pytest.raises(ValueError):
        NoiseSchedule.from_config(SD15).timesteps(1001)


@pytest.mark.parametrize("t", [np.array([999, 900, 500, 0]), np.array(951), np.array([17])])
def test_add_noise_and_velocity_match_diffusers(t):
    cfg = dict(SD15)
    ours, ref = NoiseSchedule.from_config(cfg), DDIMScheduler.from_config(cfg)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((4, 3, 5, 6), np.float32)
    noise = rng.standard_normal((4, 3, 5, 6), np.float32)
    tt = torch.from_numpy(t)
    want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    np.testing.assert_allclose(np.asarray(ours.add_noise(x0, noise, t)), want, rtol=0, atol=1e-6)
    want_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy()
    np.testing.assert_allclose(np.asarray(ours.velocity(x0, noise, t)), want_v, rtol=0, atol=1e-6)


def test_sd15_reference_values(reference_dir):
    """PASD_REFERENCE §7.4: ᾱ at the timesteps the adjustable-noise init uses."""
    folder = reference_dir / "sd15" / "scheduler"
    sched = NoiseSchedule.load(folder)
    assert sched.prediction_type == "epsilon" and sched.steps_offset == 1 and not sched.set_alpha_to_one
    for t, want in {999: 0.0046601, 951: 0.0081550, 900: 0.0141511, 751: 0.0557190, 50: 0.9515767}.items():
        assert abs(float(sched.alpha_bar(t)) - want) <= 1e-6, t
    assert sched.timesteps(20)[0] == 951
    assert sched.timesteps(4)[0] == 751
    # Same schedule when loaded from the pipeline root or the file itself.
    np.testing.assert_array_equal(NoiseSchedule.load(reference_dir / "sd15").alphas_cumprod, sched.alphas_cumprod)
    assert load_scheduler_config(folder / "scheduler_config.json")["beta_schedule"] == "scaled_linear"


def test_load_and_overrides(tmp_path):
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(dict(SD15, _class_name="PNDMScheduler")))
    sched = NoiseSchedule.load(tmp_path, timestep_spacing="trailing", prediction_type="v_prediction")
    assert sched.timestep_spacing == "trailing" and sched.prediction_type == "v_prediction"
    assert sched.clip_sample and sched.set_alpha_to_one  # DDIMScheduler defaults for absent keys
    with pytest.raises(FileNotFoundError):
        load_scheduler_config(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "bad",
    [dict(thresholding=True), dict(beta_schedule="sigmoid"), dict(prediction_type="x"), dict(timestep_spacing="karras")],
)
def test_unsupported_config_raises(bad):
    with pytest.raises(UnsupportedConfigError):
        NoiseSchedule.from_config(dict(SD15, **bad))
