"""Stable Diffusion 1.5 defaults that PASD assembly relies on, written once (SD1.5 *configs* of
the full-size networks are a fixture: `pasd_jax.fixtures.sd15`).

`SCHEDULER` is SD1.5's training schedule as a diffusers `DDIMScheduler` config: what PASD
samples and trains with, what the loader falls back to when neither the checkpoint nor the base
has a `scheduler/`, what the single-file converter writes (its `prediction_type` set per model)
and what the smoke model ships. `LATENT_SCALE` is SD's VAE scaling factor.
"""

from __future__ import annotations

SCHEDULER = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
    "prediction_type": "epsilon", "trained_betas": None,
}
# No "timestep_spacing" key, as in SD1.5's own scheduler_config.json: DDIM's default is "leading"
# anyway, and a UniPC / DPM-Solver built from this config (sample.py --scheduler) then keeps its
# class default "linspace" — test_pasd.py's UniPC timesteps 999, 949, …, 50 (PASD_REFERENCE §7.1).
