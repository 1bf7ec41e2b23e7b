"""The StableSR training step (STABLESR_REFERENCE §9.1): time-aware encoder + SFT layers over a frozen SD.

Mirrors `LatentDiffusionSRTextWT.forward / p_losses` with the released config:

    z_lr = 0.18215 · sample(E(lq)),  z_gt = 0.18215 · sample(E(gt))       frozen first stage
    t ~ U{0..999} (time_replace 1000: the original step), ε ~ N(0, I)
    x_t = √ā_t·z_gt + √(1−ā_t)·ε                                         LDM linear schedule, float32 tables
    feats = struct_encoder(z_lr, t);  loss = mean((unet(x_t, t, c_empty, feats) − ε)²)

The text is the empty prompt for every sample (`get_input` returns `['']·B`), i.e. the converted
model's constant `empty_context`. Trainable (`TRAINABLE`): every UNet parameter under a `spade`
module and all of the time-aware encoder; everything else is frozen (its gradient is never taken).
Same `TrainState`, optimiser and finite-loss guard as the PASD step (`pasd_jax.train.step`).
batch: `hq`, `lq` [B, H, W, 3] in [−1, 1] (LR bicubically resized back to H×W, as the reference).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pasd_jax.diffusion.respaced_ddpm import ldm_linear_alphas_cumprod
from pasd_jax.models.cfw_vae import split_moments
from pasd_jax.train.state import TrainState, merge

#: `configure_optimizers`: UNet parameters named *spade* + the whole structcond_stage_model.
TRAINABLE = (r"^unet/.*/spade/", r"^struct_encoder/")


class SRModels(NamedTuple):
    """The three Flax modules a StableSR step runs (static)."""

    unet: Any
    struct_encoder: Any
    first_stage: Any


def noise_tables(linear_start: float = 0.00085, linear_end: float = 0.012, timesteps: int = 1000) -> dict:
    """float32 √ā and √(1−ā) of the training schedule (the registered buffers)."""
    ac = ldm_linear_alphas_cumprod(linear_start, linear_end, timesteps)
    return {"sqrt_ac": np.sqrt(ac).astype(np.float32), "sqrt_1m_ac": np.sqrt(1.0 - ac).astype(np.float32)}


def loss_fn(trainable, frozen, batch: dict, key: jax.Array, *, models: SRModels, tables: dict,
            context: jnp.ndarray, latent_scale: float = 0.18215) -> tuple[jnp.ndarray, dict]:
    params = merge(trainable, frozen)
    k_lr, k_gt, k_noise, k_t = jax.random.split(key, 4)

    def encode(x, k):
        mean, std = split_moments(models.first_stage.apply({"params": params["first_stage"]}, x))
        return jax.lax.stop_gradient(latent_scale * (mean + std * jax.random.normal(k, mean.shape)))

    z_lr, z_gt = encode(batch["lq"], k_lr), encode(batch["hq"], k_gt)
    b = z_gt.shape[0]
    t = jax.random.randint(k_t, (b,), 0, tables["sqrt_ac"].shape[0])
    noise = jax.random.normal(k_noise, z_gt.shape, jnp.float32)
    coef = lambda name: jnp.asarray(tables[name])[t][:, None, None, None]  # noqa: E731
    x_t = coef("sqrt_ac") * z_gt + coef("sqrt_1m_ac") * noise
    feats = models.struct_encoder.apply({"params": params["struct_encoder"]}, z_lr, t)
    ctx = jnp.broadcast_to(context, (b,) + context.shape[1:])
    pred = models.unet.apply({"params": params["unet"]}, x_t, t, ctx, feats)
    mse = jnp.mean(jnp.square(pred.astype(jnp.float32) - noise))
    return mse, {"mse": mse}


def train_step(state: TrainState, frozen, batch: dict, *, models: SRModels, tables: dict, context,
               tx: optax.GradientTransformation, lr_fn: Callable, latent_scale: float = 0.18215
               ) -> tuple[TrainState, dict]:
    """One AdamW update of the trainable subtree; (new state, scalar metrics)."""
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, models=models, tables=tables, context=context,
                                                   latent_scale=latent_scale), has_aux=True)
    (loss, aux), grads = grad_fn(state.params, frozen, batch, state.step_key())
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731 - finite-loss guard
    new_state = state.replace(step=state.step + 1, params=jax.tree_util.tree_map(keep, params, state.params),
                              opt_state=jax.tree_util.tree_map(keep, opt_state, state.opt_state))
    return new_state, {"loss": loss, **aux, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32),
                       "lr": jnp.asarray(lr_fn(state.step), jnp.float32)}
