"""The PASD training step: a pure function of (state, frozen params, batch).

Mirrors the inner loop of PASD's `train_pasd.py` (PASD_REFERENCE §8):

    latents = 0.18215 · VAE posterior sample(HQ)          frozen VAE, [B, H/8, W/8, 4]
    text    = CLIP(prompt_ids)                            frozen text encoder, [B, 77, D]
    t ~ U{0..T-1}, ε ~ N(0, I), x_t = add_noise(latents, ε, t)
    rgbs, down, mid = controlnet(x_t, t, text, LQ)        trainable (incl. DR net)
    pred = unet(x_t, t, text, down, mid)                  frozen trunk + trainable PACA / `_plus`
    L = mean((pred − ε or v)²) + γ Σ_s mean|rgb_s − bilinear(HQ)_s| [+ λ Σ_s colourfulness(rgb_s)]

Gradients are taken only with respect to the trainable subtree; the frozen tree is a separate,
non-donated argument merged inside the loss, and the frozen VAE / text-encoder work (`encode`)
runs outside the differentiated function, so it keeps no activations for a backward pass. A non-finite loss or gradient leaves params and
optimiser state unchanged (the step counter still advances, so the next step draws new noise).
No I/O and no Python branching on traced values: bind everything static with `functools.partial`.

With `data.degrade_on = "device"` the loop first maps each batch through `degrade_step` (HQ +
drawn degradation parameters -> HQ + LQ), as Real-ESRGAN's `feed_data` degrades on the GPU.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from pasd_jax.assembly.bundle import PASDBundle
from pasd_jax.data import device_degrade
from pasd_jax.train import losses
from pasd_jax.train.state import TrainState, merge



@dataclasses.dataclass(frozen=True)
class StepOptions:
    """Static options of the loss (from the config)."""

    dr_loss_weight: float = 1.0
    colorfulness_weight: float = 0.0
    latent_scale: float = 0.18215


def degrade_step(batch: dict, *, canvas: device_degrade.Canvas) -> dict:
    """{hq [B, H, W, 3] in [-1, 1], degrade: params, prompt_ids} -> {hq, lq [B, H, W, 3] in [0, 1],
    prompt_ids}: the batch `train_step` takes, LQ from `device_degrade.degrade_batch`."""
    lq = device_degrade.degrade_batch((batch["hq"] + 1.0) * 0.5, batch["degrade"], canvas=canvas)
    return {"hq": batch["hq"], "lq": lq, "prompt_ids": batch["prompt_ids"]}


def example_keys(key: jax.Array, first: jnp.ndarray, batch: int) -> jax.Array:
    """Typed PRNG keys [batch] of the examples `first`, `first + 1`, …: `fold_in(key, index)`.

    Noise, timestep and posterior sample of an example depend only on its index in the stream of
    training examples, not on how the examples are grouped into (micro-)batches or devices."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(first + jnp.arange(batch, dtype=jnp.int32))


def _draws(keys: jax.Array, latent_shape: tuple, num_train_timesteps: int):
    """Per-example (posterior ε, noise ε, timestep) from the keys [B]."""
    def one(k):
        k_post, k_noise, k_t = jax.random.split(k, 3)
        return (jax.random.normal(k_post, latent_shape, jnp.float32), jax.random.normal(k_noise, latent_shape, jnp.float32),
                jax.random.randint(k_t, (), 0, num_train_timesteps))
    return jax.vmap(one)(keys)


def encode(params, batch: dict, keys: jax.Array, *, models: PASDBundle, opts: StepOptions) -> dict:
    """The frozen part: {"latents": 0.18215 · VAE posterior sample(HQ), "text": CLIP(prompt_ids)},
    gradient-free (`stop_gradient`; `train_step` runs it outside the differentiated function)."""
    text = models.text_encoder.apply({"params": params["text_encoder"]}, batch["prompt_ids"], method="encode")
    mean, logvar = models.vae.apply({"params": params["vae"]}, batch["hq"], method="encode")
    post, _, _ = _draws(keys, mean.shape[1:], models.schedule.num_train_timesteps)
    latents = (mean + jnp.exp(0.5 * logvar) * post.astype(mean.dtype)) * opts.latent_scale
    return jax.lax.stop_gradient({"latents": latents.astype(jnp.float32), "text": text})


def denoise_loss(trainable, frozen, batch: dict, cond: dict, keys: jax.Array, *, models: PASDBundle,
                 opts: StepOptions) -> tuple[jnp.ndarray, dict]:
    """The differentiated part: noise the latents, ControlNet + UNet, ε/v-MSE + DR-net L1 (+ colour)."""
    params, schedule = merge(trainable, frozen), models.schedule
    latents, text, lq, hq = cond["latents"], cond["text"], batch["lq"], batch["hq"]
    _, noise, t = _draws(keys, latents.shape[1:], schedule.num_train_timesteps)
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


def loss_fn(trainable, frozen, batch: dict, key: jax.Array, *, models: PASDBundle,
            opts: StepOptions) -> tuple[jnp.ndarray, dict]:
    """Scalar float32 loss and its parts: `encode` then `denoise_loss`, examples keyed 0…B-1 from
    `key` (networks and schedule from `models`; its params unused).

    batch: hq [B, H, W, 3] in [-1, 1], lq [B, H, W, 3] in [0, 1], prompt_ids int32 [B, 77].
    """
    keys = example_keys(key, jnp.int32(0), batch["hq"].shape[0])
    cond = encode(merge(trainable, frozen), batch, keys, models=models, opts=opts)
    return denoise_loss(trainable, frozen, batch, cond, keys, models=models, opts=opts)


def train_step(state: TrainState, frozen, batch: dict, *, models: PASDBundle,
               tx: optax.GradientTransformation, lr_fn: Callable, opts: StepOptions,
               grad_accum: int = 1) -> tuple[TrainState, dict]:
    """One update (one micro-step when `tx` is `optax.MultiSteps`). Returns (new state, metrics:
    scalar float32 arrays incl. loss parts, grad_norm, lr).

    Example i of the batch at step s is example s·B + i of the stream (`example_keys`), so k
    micro-steps of B examples under `MultiSteps(k)` make exactly the update of one step of k·B."""
    b = batch["hq"].shape[0]
    keys = example_keys(jax.random.wrap_key_data(state.rng), state.step * b, b)
    cond = encode(merge(state.params, frozen), batch, keys, models=models, opts=opts)  # outside the gradient
    grad_fn = jax.value_and_grad(functools.partial(denoise_loss, models=models, opts=opts), has_aux=True)
    (loss, aux), grads = grad_fn(state.params, frozen, batch, cond, keys)
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
