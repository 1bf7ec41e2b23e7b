"""Counted FLOPs of PASD's networks, the whole sampler and the training step (no weights needed).

Every function takes Flax modules (and, for the sampler, a `PASDBundle` whose `params` may be
`jax.ShapeDtypeStruct` leaves) and returns the FLOPs of one call, counted from the jaxpr by
`pasd_jax.perf.flops.count_flops` on abstract parameters and inputs: nothing is allocated, so the
SD1.5-size figures are cheap to get on any machine. Shapes: `latent` is the latent side (image
side = `latent · vae downscale`), `batch` the number of latents per network call.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pasd_jax.assembly.registry import abstract_params
from pasd_jax.perf.flops import ATTENTION_SCOPE, flop_breakdown

_f32 = jnp.float32


def count(fn, *args, attention: bool = False) -> int:
    """Total FLOPs of fn(*args), or with `attention` only its attention-core sub-total (q·kᵀ, p·v)."""
    parts = flop_breakdown(fn, *args)
    if attention:
        return parts.get(ATTENTION_SCOPE, 0)
    return sum(v for k, v in parts.items() if k != ATTENTION_SCOPE)


def _sds(shape, dtype=_f32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _context(module, batch: int, length: int = 77):
    return _sds((batch, length, module.cross_dims()[0]))


def controlnet_flops(controlnet, latent: int, batch: int = 1, attention: bool = False) -> int:
    """PASD ControlNet (DR net + trunk + zero convs) on [batch, latent, latent, 4] and its LQ image."""
    image = latent * controlnet.cond_downscale
    return count(lambda p, x, t, c, cond: controlnet.apply({"params": p}, x, t, c, cond),
                 abstract_params(controlnet), _sds((batch, latent, latent, controlnet.in_channels)),
                 _sds((batch,), jnp.int32), _context(controlnet, batch),
                 _sds((batch, image, image, controlnet.conditioning_channels)), attention=attention)


def unet_flops(unet, latent: int, batch: int = 1, residuals: bool | None = None, attention: bool = False) -> int:
    """UNet on [batch, latent, latent, 4]; with ControlNet residuals (mandatory for PASD families)."""
    residuals = unet.family != "stock" if residuals is None else residuals
    args = [abstract_params(unet), _sds((batch, latent, latent, unet.in_channels)), _sds((batch,), jnp.int32),
            _context(unet, batch)]
    if residuals:
        sizes, chans = unet.skip_sizes(latent, latent), unet.skip_channels()
        args.append([_sds((batch, h, w, c)) for (h, w), c in zip(sizes, chans)])
        args.append(_sds((batch,) + sizes[-1] + (unet.block_out_channels[-1],)))
    return count(lambda p, x, t, c, *r: unet.apply({"params": p}, x, t, c, *r), *args, attention=attention)


def vae_encode_flops(vae, image: int, batch: int = 1, attention: bool = False) -> int:
    """VAE encoder (posterior moments) on [batch, image, image, 3]."""
    return count(lambda p, x: vae.apply({"params": p}, x, method=vae.encode), abstract_params(vae),
                 _sds((batch, image, image, vae.in_channels)), attention=attention)


def vae_decode_flops(vae, latent: int, batch: int = 1, attention: bool = False) -> int:
    """VAE decoder on [batch, latent, latent, latent_channels]."""
    return count(lambda p, z: vae.apply({"params": p}, z, method=vae.decode), abstract_params(vae),
                 _sds((batch, latent, latent, vae.latent_channels)), attention=attention)


def sampler_flops(sampler, image: int, batch: int = 1, text_length: int = 77) -> int:
    """One compiled sampler call (`Sampler._sample_impl`: encode, ANS, scanned steps, decode) on
    `batch` images of `image`² px; `sampler.models.params` may be abstract."""
    from pasd_jax.sampling.sampler import Noises, SampleInputs, latent_shape

    models = sampler.models
    lat = latent_shape(models, (batch, image, image, 3))
    n_text = 2 * batch if sampler.settings.guidance else batch
    inputs = SampleInputs(
        lq=_sds((batch, image, image, 3)), text=_sds((n_text, text_length, models.text_encoder.hidden_size)),
        noises=Noises(_sds(lat), _sds(lat), _sds(lat), jax.eval_shape(lambda: jax.random.key(0))),
        guidance_scale=_sds(()), conditioning_scale=_sds(()), added_noise_level=_sds((), jnp.int32))
    params = jax.tree.map(lambda x: _sds(x.shape, x.dtype), models.params)
    return count(sampler._sample_impl, params, inputs)


def train_step_flops(models, resolution: int, batch: int = 1, remat_policy: str = "none",
                     trainable=("^controlnet/", "pixel_attentions", "norm2_plus", "attn2_plus", "proj_in_plus")) -> int:
    """One training step (`pasd_jax.train.step.train_step`: frozen VAE + CLIP forward, ControlNet +
    UNet forward and backward wrt the trainable subtree, AdamW) at `resolution`², `batch` images.
    `models`: a `PASDBundle` (its params are not used)."""
    import optax

    from pasd_jax.train.state import TrainState, split
    from pasd_jax.train.step import StepOptions, train_step

    from pasd_jax.assembly.bundle import COMPONENTS

    params = {name: abstract_params(getattr(models, name)) for name in COMPONENTS}
    train, frozen = split(params, trainable)
    tx = optax.adamw(1e-5)
    state = jax.eval_shape(functools.partial(TrainState.create, tx=tx, seed=0), train)
    batch_data = {"hq": _sds((batch, resolution, resolution, 3)), "lq": _sds((batch, resolution, resolution, 3)),
                  "prompt_ids": _sds((batch, 77), jnp.int32)}
    if remat_policy != "none":  # per-block remat lives in the modules (`train.loop` does the same)
        models = dataclasses.replace(models, unet=models.unet.clone(remat_policy=remat_policy),
                                     controlnet=models.controlnet.clone(remat_policy=remat_policy))
    step = functools.partial(train_step, models=models, tx=tx, lr_fn=lambda s: 1e-5, opts=StepOptions())
    return count(step, state, frozen, batch_data)

