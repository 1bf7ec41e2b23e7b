"""Every sampling default, written once: the released-model recipe (PASD_REFERENCE §7.1) with DDIM.

`sample.py`'s flags (`pasd_jax.sampling.cli`), `RestoreOptions` (pipeline), `SamplerSettings`
(sampler) and the tiled VAE (`tiled_vae`) all take their defaults and choices from here, so a
default changes in one place.
"""

from __future__ import annotations

# ---- prompts (§7.1–7.3) ------------------------------------------------------------------------
ADDED_PROMPT = "clean, high-resolution, 8k"
NEGATIVE_PROMPT = "blurry, dotted, noise, raster lines, unclear, lowres, over-smoothed"
COLORIZE_NEGATIVE_PROMPT = "b&w, color bleeding"

# ---- diffusion ---------------------------------------------------------------------------------
STEPS = 20                    # scheduler steps
SCHEDULER = "ddim"            # the paper's results; "unipc" is test_pasd.py's (README "Schedulers")
SCHEDULERS = ("ddim", "unipc", "dpmpp_2m", "lcm")  # = pasd_jax.diffusion.SCHEDULER_CLASSES
LCM_STEPS = 4                 # steps with LCM (an LCM-LoRA) unless given
ANS_COMPAT = "closed_form"    # ANS start: closed form with ᾱ lookups; "reference": the scheduler's add_noise
ANS_COMPATS = ("closed_form", "reference")
GUIDANCE_SCALE = 9.0          # CFG scale; ≤ 1 skips the negative branch
CONDITIONING_SCALE = 1.0      # ControlNet residual scale
ADDED_NOISE_LEVEL = 900       # ANS level a (≤ 0 switches ANS off, §7.4)
ETA = 0.0                     # DDIM η (0: deterministic)
INIT = "ans"                  # start latent: LQ latent + adjustable noise
INITS = ("ans", "noise")
SEED = 0

# ---- compute dtype (`sampling.precision`): "auto" = bfloat16 on GPU/TPU, float32 on CPU (the parity path)
DTYPE_AUTO = "auto"
DTYPE = DTYPE_AUTO            # sample.py --dtype default
DTYPES = (DTYPE_AUTO, "float32", "bfloat16")
BACKEND_DTYPES = {"gpu": "bfloat16", "cuda": "bfloat16", "rocm": "bfloat16", "tpu": "bfloat16"}  # others: float32

# ---- image processing (§7.2, §7.7) -------------------------------------------------------------
UPSCALE = 1
PROCESS_SIZE = 768            # shorter side the model runs at (minimum)
COLOR_FIX = "wavelet"
COLOR_FIXES = ("wavelet", "adain", "none")
MODE = "realisr"
MODES = ("realisr", "colorize")

# ---- latent tiling (§7.5), latent px -----------------------------------------------------------
TILE_SIZE = 320               # tiling is on when h·w > TILE_SIZE²
TILE_OVERLAP = 8
TILES_PER_CALL = 1

# ---- tiled VAE (§7.6): PASD `test_pasd.py` encoder_tiled_size 1024, decoder_tiled_size 224, VAEHook pads
VAE_TILING = "auto"           # "auto": above the thresholds below; "always"; "never"
VAE_TILINGS = ("auto", "always", "never")
ENCODER_TILE, ENCODER_PAD = 1024, 32   # image px
DECODER_TILE, DECODER_PAD = 224, 11    # latent px

# ---- StableSR (`--method stablesr`): scripts/sr_val_ddpm_text_T_vqganfin_oldcanvas_tile.py's defaults
# (STABLESR_REFERENCE §8.5); `sr_script` "old" runs sr_val_ddpm_text_T_vqganfin_old.py instead.
STABLESR = {"ddpm_steps": 1000, "dec_w": 0.5, "upscale": 4, "input_size": 512, "tile_overlap": 32,
            "color_fix": "nofix", "vqgantile_size": 1280, "vqgantile_stride": 1000, "seed": 42,
            "tiles_per_call": 1, "sr_script": "tile"}
STABLESR_COLOR_FIXES = ("adain", "wavelet", "nofix")
