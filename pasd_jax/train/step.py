"""The PASD training step: a pure function of (state, frozen params, batch).

Mirrors the inner loop of PASD's `train_pasd.py` (PASD_REFERENCE §8):

    latents = 0.18215 · VAE posterior sample(HQ)          frozen VAE, [B, H/8, W/8, 4]
    text    = CLIP(prompt_ids)                            frozen text encoder, [B, 77, D]
    t ~ U{0..T-1}, ε ~ N(0, I), x_t = add_noise(latents, ε, t)
    rgbs, down, mid = controlnet(x_t, t, text, LQ)        trainable (incl. DR net)
    pred = unet(x_t, t, text, down, mid)                  frozen trunk + trainable PACA / `_plus`
    L = mean((pred − ε or v)²) + γ Σ_s mean|rgb_s − bilinear(HQ)_s| [+ λ Σ_s colourfulness(rgb_s)]

Gradients are taken only with respect to the trainable subtree; the frozen tree is a separate,
non-donated argument merged inside the loss. A non-finite loss or gradient leaves params and
optimiser state unchanged (the step counter still advances, so the next step draws new noise).
No I/O and no Python branching on traced values: bind everything static with `functools.partial`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from pasd_jax.assembly.bundle import PASDBundle
from pasd_jax.train import losses
from pasd_jax.train.state import TrainState, merge



@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static options of the loss (from the config)."""

    dr_loss_weight: float = 1.0
    colorfulness_weight: float = 0.0
    latent_scale: float = 0.18215


def loss_fn(trainable, frozen, batch: dict, key: jax.Array, *, models: PASDBundle,
            opts: StepOptions) -> tuple[jnp.ndarray, dict]:
    """Scalar float32 loss and its parts (networks and schedule from `models`; its params unused).

    batch: hq [B, H, W, 3] in [-1, 1], lq [B, H, W, 3] in [0, 1], prompt_ids int32 [B, 77].
    """
    params, schedule = merge(trainable, frozen), models.schedule
    k_post, k_noise, k_t = jax.random.split(key, 3)
    hq, lq = batch["hq"], batch["lq"]
    text = models.text_encoder.apply({"params": params["text_encoder"]}, batch["prompt_ids"], method="encode")
    mean, logvar = models.vae.apply({"params": params["vae"]}, hq, method="encode")
    latents = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_post, mean.shape)) * opts.latent_scale
    text, latents = jax.lax.stop_gradient(text), jax.lax.stop_gradient(latents)

    noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
    t = jax.random.randint(k_t, (latents.shape[0],), 0, schedule.num_train_timesteps)
    x_t = schedule.add_noise(latents, noise, t)

    # Remat, if any, is inside the modules (per block, their `remat_policy` field).
    rgbs, down, mid = models.controlnet.apply({"params": params["controlnet"]}, x_t, t, text, lq)
    pred = models.unet.apply({"params": params["unet"]}, x_t, t, text, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid)
    target = schedule.velocity(latents, noise, t) if schedule.prediction_type == "v_prediction" else noise
    mse = losses.diffusion_mse(pred, target)
    l1, l1_parts = losses.dr_l1(rgbs, hq)
    loss = mse + opts.dr_loss_weight * l1
    aux = {"mse": mse, "dr_l1": l1, **{f"dr_l1_{i}": p for i, p in enumerate(l1_parts)}}
    if opts.colorfulness_weight:
        color = sum(losses.colorfulness(r) for r in rgbs)
        loss = loss + opts.colorfulness_weight * color
        aux["colorfulness"] = color
    return loss, aux


def train_step(state: TrainState, frozen, batch: dict, *, models: PASDBundle,
               tx: optax.GradientTransformation, lr_fn: Callable, opts: StepOptions,
               grad_accum: int = 1) -> tuple[TrainState, dict]:
    """One update. Returns (new state, metrics: scalar float32 arrays incl. loss parts, grad_norm, lr)."""
    key = state.step_key()
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, models=models, opts=opts),
                                 has_aux=True)
    (loss, aux), grads = grad_fn(state.params, frozen, batch, key)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731 - finite-loss guard
    params = jax.tree_util.tree_map(keep, params, state.params)
    opt_state = jax.tree_util.tree_map(keep, opt_state, state.opt_state)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = {"loss": loss, **aux, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32),
               "lr": jnp.asarray(lr_fn(state.step // grad_accum), jnp.float32)}
    return new_state, metrics
