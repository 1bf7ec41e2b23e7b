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

Batches: `prepare` pre-processes and draws an image's noises from its seed; `restore_batch` runs
prepared images of one processed size through one compiled call (padded to a fixed call size by
repeating the last image, so a short batch never recompiles); `restore` is a batch of one. Each
image keeps its own noises and prompt, so its result does not depend on the batch.

Deliberate divergence: the reference appends the added prompt to a caption without a separator
(§9.7); we join non-empty parts with ", ".
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax.assembly.tokenizer import tokenize
from pasd_jax.imaging import color_fix, preprocess
from pasd_jax.sampling import defaults
from pasd_jax.sampling.sampler import Noises, Sampler, SamplerSettings, latent_shape, make_inputs

_TEXT_CACHE = 64  # prompts (and seed/shape noise draws) kept per Restorer
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
    seconds: float            # this image's share of its batch's wall time (pre-processing included)
    batch: int = 1            # images restored in the same compiled call (padding excluded)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """One pre-processed image, ready to batch with others of the same `lq` shape."""

    lq: np.ndarray            # float32 [H', W', 3] in [0, 1]
    info: preprocess.PreprocessInfo
    prompt: str               # full prompt (with the added prompt)
    seed: int
    gray: Optional[np.ndarray]  # colorization: the original luma, merged back after sampling
    seconds: float            # pre-processing time

    @property
    def shape(self) -> tuple:
        return self.lq.shape


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
        self._text_cache: dict = {}
        self._noise_cache: dict = {}

    def encode_prompts(self, prompts: list[str]) -> jnp.ndarray:
        """CLIP last hidden states [B, 77, D] of `prompts` (padded/truncated to 77 tokens)."""
        ids = tokenize(self.models.tokenizer, prompts)
        return self._encode_text(self.models.params["text_encoder"], jnp.asarray(ids))

    def _embedding(self, prompt: str) -> jnp.ndarray:
        """[1, 77, D] embedding of one prompt, cached (a folder often repeats its prompts)."""
        emb = self._text_cache.get(prompt)
        if emb is None:
            emb = self.encode_prompts([prompt])
            if len(self._text_cache) >= _TEXT_CACHE:
                self._text_cache.pop(next(iter(self._text_cache)))
            self._text_cache[prompt] = emb
        return emb

    def text_embeddings(self, prompt: str, *more: str) -> jnp.ndarray:
        """Embeddings of one image per prompt: [negative × B; positive_1 … positive_B] with
        guidance, else the positives only ([2B or B, 77, D])."""
        positives = [self._embedding(p) for p in (prompt,) + more]
        if self.sampler.settings.guidance:
            positives = [self._embedding(self.options.negative)] * len(positives) + positives
        return jnp.concatenate(positives)

    def preprocess(self, rgb: np.ndarray):
        """uint8 [H, W, 3] -> (lq float32 [H', W', 3], PreprocessInfo)."""
        o = self.options
        if o.mode == "colorize":
            return preprocess.prepare_grayscale_input(rgb, process_size=o.process_size)
        return preprocess.prepare_input(rgb, upscale=o.upscale, process_size=o.process_size)

    def prepare(self, rgb: np.ndarray, *, prompt: str = "", seed: int = 0) -> Prepared:
        """Pre-process one uint8 [H, W, 3] RGB image (cheap; batch the results by `.shape`)."""
        start = time.perf_counter()
        lq, info = self.preprocess(rgb)
        gray = preprocess.to_gray(rgb) if self.options.mode == "colorize" else None
        return Prepared(lq=np.asarray(lq, np.float32), info=info, prompt=join_prompt(prompt, self.options.added_prompt),
                        seed=seed, gray=gray, seconds=time.perf_counter() - start)

    def restore_batch(self, items: Sequence[Prepared], call_size: Optional[int] = None) -> list[RestoreResult]:
        """Restore prepared images of one processed size in one compiled call of `call_size`
        images (default: len(items)); a shorter batch is padded by repeating its last image."""
        if not items:
            return []
        shapes = {it.shape for it in items}
        if len(shapes) > 1:
            raise ValueError(f"one batch needs one processed size, got {sorted(shapes)}")
        n = len(items)
        call_size = n if call_size is None else call_size
        if call_size < n:
            raise ValueError(f"{n} images do not fit a call of {call_size}")
        start = time.perf_counter()
        o = self.options
        padded = list(items) + [items[-1]] * (call_size - n)
        lq = jnp.asarray(np.stack([it.lq for it in padded]))
        text = self.text_embeddings(*(it.prompt for it in padded))
        one = latent_shape(self.models, (1,) + items[0].shape)
        noises = Noises.stack([self._noises(it.seed, one) for it in padded])
        inputs = make_inputs(lq, text, noises, guidance_scale=o.guidance_scale,
                             conditioning_scale=o.conditioning_scale, added_noise_level=o.added_noise_level)
        images = self.sampler(inputs)["image"]
        outs = []
        for i, it in enumerate(items):
            sr, rounding = images[i], "round"
            if o.mode == "realisr" and o.color_fix != "none":
                sr, rounding = _COLOR_FIXES[o.color_fix](sr, lq[i]), "truncate"  # §7.7, §9.13
            sr = np.asarray(jax.device_get(sr))
            if o.mode == "colorize":
                outs.append(preprocess.merge_chroma(preprocess.float_to_uint8(sr), it.gray))
            else:
                outs.append(preprocess.finalize_output(sr, it.info, rounding=rounding))
        share = (time.perf_counter() - start) / n
        return [RestoreResult(image=out, prompt=it.prompt, processed_size=it.info.processed_size,
                              seconds=share + it.seconds, batch=n) for out, it in zip(outs, items)]

    def _noises(self, seed: int, shape: tuple) -> Noises:
        """All draws of one image from its seed (cached: a folder run usually shares one seed)."""
        key = (seed, shape)
        if key not in self._noise_cache:
            if len(self._noise_cache) >= _TEXT_CACHE:
                self._noise_cache.pop(next(iter(self._noise_cache)))
            self._noise_cache[key] = Noises.draw(jax.random.key(seed), shape)
        return self._noise_cache[key]

    def restore(self, rgb: np.ndarray, *, prompt: str = "", seed: int = 0) -> RestoreResult:
        """Restore one uint8 [H, W, 3] RGB image; `seed` fixes every random draw."""
        return self.restore_batch([self.prepare(rgb, prompt=prompt, seed=seed)])[0]
