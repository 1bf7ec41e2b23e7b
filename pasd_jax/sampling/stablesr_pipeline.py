"""StableSR restoration as the original scripts do it (STABLESR_REFERENCE §8.3, §8.5), host orchestration.

* `restore_old` mirrors `scripts/sr_val_ddpm_text_T_vqganfin_old.py`: a batch of input_size²
  LR images; init latent from the **CFW** encoder; the sampler starts from pure noise of the
  config's `image_size/8` (quirk §10.7: the noised LR latent is drawn and discarded); CFW decode
  with the LR features and w; colour fix vs the LR image; `clamp((x+1)/2)`.
* `restore_tile` mirrors `..._oldcanvas_tile.py`: bicubic up-scaling (torch kernel), the 32-px
  reflect padding (quirk §10.3), VQGAN pixel tiling when a padded side exceeds `vqgantile_size`
  (`vqgan_patches`, column-major as `ImageSpliterTh`), per patch: init latent from the SR model's
  own first stage, x_T = q_sample(z, 999), latent canvas sampling, CFW decode, colour fix vs the
  patch, Gaussian blending of the patches; then the optional downscale of the *padded* result
  (quirk §10.4) and the crop.

Random draws go through a `noise` object with `draw(kind, shape)` and `reseed()` (the scripts'
`seed_everything` before every patch): `SeededNoise` (jax.random, deterministic per seed) or the
golden harness' saved tensors. Every function returns a dict of named intermediate tensors (NHWC)
whose names follow the goldens' README; `image` is the float result in [0, 1].

Divergence: the reference crashes when one padded side is <= vqgantile_size < the other (quirk
§10.5); we cut the short patches and weight them with a Gaussian of their own size.
"""

from __future__ import annotations

import dataclasses
import functools
import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax.assembly.stablesr import StableSRBundle
from pasd_jax.diffusion.respaced_ddpm import RespacedSchedule
from pasd_jax.imaging.color_fix import adaptive_instance_normalization, wavelet_reconstruction
from pasd_jax.imaging.tiling import gaussian_weights
from pasd_jax.imaging.torch_resize import reflect_pad_to_32, resize_bicubic, scaled_size
from pasd_jax.models.cfw_vae import split_moments
from pasd_jax.sampling import defaults
from pasd_jax.sampling.stablesr_sampler import canvas_loop, make_ddpm_loop

COLOR_FIXES = defaults.STABLESR_COLOR_FIXES
_D = defaults.STABLESR


@dataclasses.dataclass(frozen=True)
class StableSROptions:
    """Script options; defaults are `sr_val_ddpm_text_T_vqganfin_oldcanvas_tile.py`'s (§8.5,
    `pasd_jax.sampling.defaults.STABLESR`)."""

    ddpm_steps: int = _D["ddpm_steps"]
    dec_w: float = _D["dec_w"]
    colorfix_type: str = _D["color_fix"]
    upscale: float = float(_D["upscale"])
    input_size: int = _D["input_size"]
    tile_overlap: int = _D["tile_overlap"]
    vqgantile_size: int = _D["vqgantile_size"]
    vqgantile_stride: int = _D["vqgantile_stride"]
    tiles_per_call: int = _D["tiles_per_call"]

    def __post_init__(self):
        if self.colorfix_type not in COLOR_FIXES:
            raise ValueError(f"colorfix_type must be one of {COLOR_FIXES}, got {self.colorfix_type!r}")


class SeededNoise:
    """`torch.randn` stand-in: a jax.random stream restarted by `reseed()` (the scripts'
    `seed_everything(seed)`); deterministic for a given seed and call order."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self.reseed()

    def reseed(self) -> None:
        self._key = jax.random.key(self.seed)

    def draw(self, kind: str, shape) -> np.ndarray:
        self._key, sub = jax.random.split(self._key)
        return np.asarray(jax.random.normal(sub, tuple(shape), jnp.float32))


@functools.lru_cache(maxsize=8)
def _compiled(unet, struct_encoder, first_stage, cfw) -> dict:
    """Jitted pieces for one architecture (Flax modules hash by their fields), shared by every
    load of the same model so a second load does not recompile."""
    return dict(
        cfw_encode=jax.jit(lambda p, x: cfw.apply({"params": p}, x, method="encode")),
        cfw_decode=jax.jit(lambda p, z, f, w: cfw.apply({"params": p}, z, f, w, method="decode")),
        first_stage=jax.jit(lambda p, x: first_stage.apply({"params": p}, x)),
        ddpm=make_ddpm_loop(unet, struct_encoder),
        adain=jax.jit(adaptive_instance_normalization), wavelet=jax.jit(wavelet_reconstruction))


def _fns(models: StableSRBundle) -> dict:
    return _compiled(models.unet, models.struct_encoder, models.first_stage, models.cfw)


def color_fix(fns: dict, kind: str, x, reference):
    if kind == "nofix":
        return x
    return fns[kind](x, reference)


def _net_params(models: StableSRBundle) -> dict:
    return {"unet": models.params["unet"], "struct_encoder": models.params["struct_encoder"]}


def _schedule_record(schedule: RespacedSchedule) -> dict:
    out = {f"schedule.{k}": v for k, v in schedule.buffers().items()}
    out["schedule.ori_timesteps"] = schedule.timesteps
    return out


def _step_record(prefix: str, schedule: RespacedSchedule, latents, batch: int) -> dict:
    tables, out = schedule.step_tables(), {}
    for k in range(len(schedule.timesteps)):
        out[f"{prefix}step{k}.t_index"] = np.full((batch,), tables["index"][k], np.int64)
        out[f"{prefix}step{k}.t_orig"] = np.full((batch,), tables["t"][k], np.int64)
        out[f"{prefix}step{k}.latents"] = np.asarray(latents[k])
    return out


def _step_noises(noise, steps: int, shape) -> np.ndarray:
    return np.stack([noise.draw("noise_like", shape) for _ in range(steps)])


def restore_old(models: StableSRBundle, images: np.ndarray, options: StableSROptions, noise) -> dict:
    """`_old` script on a batch of LR images [B, S, S, 3] in [−1, 1] (S = input_size)."""
    fns, sf = _fns(models), models.scale_factor
    x = jnp.asarray(images, jnp.float32)
    moments, feats = fns["cfw_encode"](models.params["cfw"], x)
    mean, std = split_moments(moments)
    init_latent = sf * (mean + std * noise.draw("sample", mean.shape))
    schedule = models.schedule(options.ddpm_steps)
    noise.draw("main", mean.shape)  # x_T = q_sample_respace(...) is computed, then discarded (§10.7)
    side = int(models.sampling.get("image_size", options.input_size)) // 8
    b = x.shape[0]
    x_t = jnp.asarray(noise.draw("p_sample_loop", (b, side, side, mean.shape[-1])))
    noises = _step_noises(noise, len(schedule.timesteps), x_t.shape)
    tables = {k: jnp.asarray(v) for k, v in schedule.step_tables().items()}
    final, traj = fns["ddpm"](_net_params(models), x_t, init_latent, jnp.asarray(models.context), tables,
                              jnp.asarray(noises))
    decoded = fns["cfw_decode"](models.params["cfw"], final / sf, feats, options.dec_w)
    fixed = color_fix(fns, options.colorfix_type, decoded, x)
    out = {"init_latent": np.asarray(init_latent), **_schedule_record(schedule),
           **_step_record("", schedule, traj, b), "x_samples": np.asarray(decoded),
           "x_samples_colorfix": np.asarray(fixed), "image": np.asarray(jnp.clip((fixed + 1) / 2, 0, 1))}
    return out


def axis_starts(length: int, patch: int, stride: int) -> list[int]:
    """`ImageSpliterTh` starts along one axis: [0] if length <= patch, else range(0, L, stride) with
    starts past L − patch snapped to L − patch, de-duplicated in order."""
    if length <= patch:
        return [0]
    starts = []
    for s in range(0, length, stride):
        s = length - patch if s + patch > length else s
        if s not in starts:
            starts.append(s)
    return starts


def vqgan_patches(h: int, w: int, patch: int, stride: int) -> list[tuple[int, int, int, int]]:
    """(y0, x0, ph, pw) of the pixel patches, in `ImageSpliterTh` order (height varies fastest)."""
    hs, ws = axis_starts(h, patch, stride), axis_starts(w, patch, stride)
    return [(y, x, min(patch, h - y), min(patch, w - x)) for x in ws for y in hs]


def _sample_patch(models, fns, patch, options, noise, prefix: str, out: dict):
    """One VQGAN patch [1, H, W, 3] -> colour-fixed CFW decode [1, H, W, 3]; records into out."""
    sf = models.scale_factor
    noise.reseed()
    mean, std = split_moments(fns["first_stage"](models.params["first_stage"], patch))
    init_latent = sf * (mean + std * noise.draw("sample", mean.shape))
    schedule = models.schedule(options.ddpm_steps)
    x_t = schedule.q_sample(init_latent, noise.draw("main", mean.shape))
    noises = _step_noises(noise, len(schedule.timesteps), mean.shape)
    tables = {k: jnp.asarray(v) for k, v in schedule.step_tables().items()}
    final, traj = canvas_loop(models.unet, models.struct_encoder, _net_params(models), x_t, init_latent,
                              jnp.asarray(models.context), tables, jnp.asarray(noises),
                              tile=options.input_size // 8, overlap=options.tile_overlap,
                              tiles_per_call=options.tiles_per_call)
    _, feats = fns["cfw_encode"](models.params["cfw"], patch)
    decoded = fns["cfw_decode"](models.params["cfw"], final / sf, feats, options.dec_w)
    fixed = color_fix(fns, options.colorfix_type, decoded, patch)
    out.update({f"{prefix}init_latent": np.asarray(init_latent), f"{prefix}x_T": np.asarray(x_t),
                **_step_record(prefix, schedule, traj, 1), f"{prefix}x_samples_colorfix": np.asarray(fixed)})
    out.update(_schedule_record(schedule))
    return np.asarray(fixed)


def restore_tile(models: StableSRBundle, image: np.ndarray, options: StableSROptions, noise, progress=None) -> dict:
    """`_oldcanvas_tile` script on one LR image [1, h, w, 3] in [−1, 1] (module docstring)."""
    fns = _fns(models)
    h, w = image.shape[1:3]
    scale = max(options.input_size / min(h, w), options.upscale)
    size = scaled_size(h, w, scale)
    up = np.clip(resize_bicubic(image, size), -1.0, 1.0)
    padded, _ = reflect_pad_to_32(up)
    ph, pw = padded.shape[1:3]
    out = {"lq_upsampled": up}
    tiled = ph > options.vqgantile_size or pw > options.vqgantile_size
    patches = vqgan_patches(ph, pw, options.vqgantile_size, options.vqgantile_stride) if tiled else [(0, 0, ph, pw)]
    acc = np.zeros(padded.shape, np.float32)
    cnt = np.zeros(padded.shape, np.float32)
    for p, (y, x, hh, ww) in enumerate(patches):
        prefix = f"patch{p}." if tiled else ""
        fixed = _sample_patch(models, fns, jnp.asarray(padded[:, y:y + hh, x:x + ww]), options, noise, prefix, out)
        weight = gaussian_weights(hh, ww)[None, :, :, None]
        acc[:, y:y + hh, x:x + ww] += fixed * weight
        cnt[:, y:y + hh, x:x + ww] += np.broadcast_to(weight, fixed.shape)
        if progress is not None:
            progress(p + 1, len(patches))
    gathered = acc / cnt if tiled else fixed
    result = np.clip((gathered + 1) / 2, 0.0, 1.0)
    if scale > options.upscale:
        result = np.clip(resize_bicubic(result, (int(ph * options.upscale / scale), int(pw * options.upscale / scale))),
                         0.0, 1.0)
    out.update({"gathered": gathered, "image": result[:, :size[0], :size[1]]})
    return out
