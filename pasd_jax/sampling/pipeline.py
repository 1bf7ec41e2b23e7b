"""Image in, restored image out: PASD's `test_pasd.py` around the compiled sampler (host side).

Per image (PASD_REFERENCE §7.1–7.8):
1. pre-process (`pasd_jax.imaging.preprocess`): upscale, shorter side to `process_size`, multiple
   of 8; colorization mode converts to gray and keeps the original luma;
2. prompts: the image's prompt (CLI `--prompt` or a sidecar `<image>.txt`) + the added prompt;
   negative prompt; both CLIP-encoded (negative first, §7.3);
3. the compiled `Sampler` (ANS init, scanned scheduler + CFG, tiling, VAE decode), noises drawn
   from the seed, so a seed gives the same image on every run; the scheduler is the options' or
   the models' default (DDIM unless the checkpoint/base config names UniPC, DPM-Solver++ or LCM);
4. colour fix (`wavelet` default, `adain`, `none`) against the pre-processed LQ, resize back to
   `original × upscale`; colorization merges the output's chroma with the original luma.

Deliberate divergence: the reference appends the added prompt to a caption without a separator
(§9.7); we join non-empty parts with ", ".
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax.assembly.tokenizer import tokenize
from pasd_jax.imaging import color_fix, preprocess
from pasd_jax.sampling import defaults
from pasd_jax.sampling.sampler import Noises, Sampler, SamplerSettings, latent_shape, make_inputs

_COLOR_FIXES = {"wavelet": jax.jit(color_fix.wavelet_color_fix), "adain": jax.jit(color_fix.adain_color_fix)}


@dataclasses.dataclass(frozen=True)
class RestoreOptions:
    """User-facing settings; defaults are the released-model recipe (§7.1) with DDIM.

    scheduler: "ddim", "unipc", "dpmpp_2m", "lcm", or None for the models' `default_scheduler`.
    ans_compat: "closed_form" or "reference" (see `SamplerSettings`).
    """

    steps: int = defaults.STEPS
    guidance_scale: float = defaults.GUIDANCE_SCALE
    conditioning_scale: float = defaults.CONDITIONING_SCALE
    added_noise_level: int = defaults.ADDED_NOISE_LEVEL  # ≤ 0 switches ANS off
    init: str = defaults.INIT                            # "ans" (from the LQ latent) or "noise" (pure noise)
    eta: float = defaults.ETA
    upscale: int = defaults.UPSCALE
    process_size: int = defaults.PROCESS_SIZE
    color_fix: str = defaults.COLOR_FIX
    mode: str = defaults.MODE
    added_prompt: str = defaults.ADDED_PROMPT
    negative_prompt: Optional[str] = None  # None: the mode's default
    tile_size: int = defaults.TILE_SIZE
    tile_overlap: int = defaults.TILE_OVERLAP
    tiles_per_call: int = defaults.TILES_PER_CALL
    vae_tiling: str = defaults.VAE_TILING
    scheduler: Optional[str] = None                      # None: the models' default_scheduler
    ans_compat: str = defaults.ANS_COMPAT
    progress: bool = False                               # per-step callback from the scan (progress.py)

    def __post_init__(self):
        if self.color_fix not in defaults.COLOR_FIXES:
            raise ValueError(f"color_fix must be one of {defaults.COLOR_FIXES}, got {self.color_fix!r}")
        if self.mode not in defaults.MODES:
            raise ValueError(f"mode must be one of {defaults.MODES}, got {self.mode!r}")
        if self.upscale < 1 or self.process_size < 8:
            raise ValueError("upscale must be ≥ 1 and process_size ≥ 8")

    @property
    def negative(self) -> str:
        if self.negative_prompt is not None:
            return self.negative_prompt
        return defaults.COLORIZE_NEGATIVE_PROMPT if self.mode == "colorize" else defaults.NEGATIVE_PROMPT

    def sampler_settings(self, default_scheduler: str = "ddim") -> SamplerSettings:
        return SamplerSettings(num_steps=self.steps, eta=self.eta, guidance=self.guidance_scale > 1.0,
                               init=self.init, tile_size=self.tile_size, tile_overlap=self.tile_overlap,
                               tiles_per_call=self.tiles_per_call, vae_tiling=self.vae_tiling,
                               scheduler=self.scheduler or default_scheduler, ans_compat=self.ans_compat,
                               progress=self.progress)


@dataclasses.dataclass(frozen=True)
class RestoreResult:
    image: np.ndarray         # uint8 [H·upscale, W·upscale, 3]
    prompt: str
    processed_size: tuple     # (W, H) the model ran at
    seconds: float


def join_prompt(*parts: Optional[str]) -> str:
    """Non-empty parts joined with ", " (the reference omits the separator, §9.7)."""
    return ", ".join(p.strip() for p in parts if p and p.strip())


class Restorer:
    """Restores images with one `PASDBundle` (with params) and one `RestoreOptions`; reuses compiled code for
    every image of the same processed size."""

    def __init__(self, models, options: RestoreOptions = RestoreOptions()):
        self.models = models
        self.options = options
        self.sampler = Sampler(models, options.sampler_settings(getattr(models, "default_scheduler", "ddim")))
        te = models.text_encoder
        self._encode_text = jax.jit(lambda p, ids: te.apply({"params": p}, ids, method=te.encode))
        self._negative_emb = None

    def encode_prompts(self, prompts: list[str]) -> jnp.ndarray:
        """CLIP last hidden states [B, 77, D] of `prompts` (padded/truncated to 77 tokens)."""
        ids = tokenize(self.models.tokenizer, prompts)
        return self._encode_text(self.models.params["text_encoder"], jnp.asarray(ids))

    def text_embeddings(self, prompt: str) -> jnp.ndarray:
        """[negative; positive] embeddings with guidance, else the positive one only."""
        positive = self.encode_prompts([prompt])
        if not self.sampler.settings.guidance:
            return positive
        if self._negative_emb is None:
            self._negative_emb = self.encode_prompts([self.options.negative])
        return jnp.concatenate([self._negative_emb, positive])

    def preprocess(self, rgb: np.ndarray):
        """uint8 [H, W, 3] -> (lq float32 [H', W', 3], PreprocessInfo)."""
        o = self.options
        if o.mode == "colorize":
            return preprocess.prepare_grayscale_input(rgb, process_size=o.process_size)
        return preprocess.prepare_input(rgb, upscale=o.upscale, process_size=o.process_size)

    def restore(self, rgb: np.ndarray, *, prompt: str = "", seed: int = 0) -> RestoreResult:
        """Restore one uint8 [H, W, 3] RGB image; `seed` fixes every random draw."""
        start = time.perf_counter()
        o = self.options
        lq, info = self.preprocess(rgb)
        full_prompt = join_prompt(prompt, o.added_prompt)
        text = self.text_embeddings(full_prompt)
        lq_b = jnp.asarray(lq)[None]
        noises = Noises.draw(jax.random.key(seed), latent_shape(self.models, lq_b.shape))
        inputs = make_inputs(lq_b, text, noises, guidance_scale=o.guidance_scale,
                             conditioning_scale=o.conditioning_scale, added_noise_level=o.added_noise_level)
        sr = self.sampler(inputs)["image"][0]
        rounding = "round"
        if o.mode == "realisr" and o.color_fix != "none":
            sr, rounding = _COLOR_FIXES[o.color_fix](sr, lq_b[0]), "truncate"  # §7.7, §9.13
        sr = np.asarray(jax.device_get(sr))
        if o.mode == "colorize":
            out = preprocess.merge_chroma(preprocess.float_to_uint8(sr), preprocess.to_gray(rgb))
        else:
            out = preprocess.finalize_output(sr, info, rounding=rounding)
        return RestoreResult(image=out, prompt=full_prompt, processed_size=info.processed_size,
                             seconds=time.perf_counter() - start)
