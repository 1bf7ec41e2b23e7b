"""The optimiser: optax chain built from `config.optim`.

Mirrors PASD's `torch.optim.AdamW(lr, betas, weight_decay, eps)` with accelerate's
`clip_grad_norm_(params, 1.0)` and the "constant" lr scheduler (PASD_REFERENCE §8; its warmup
argument is ignored by that scheduler, ours honours `warmup_steps` when set). Gradient
accumulation (`grad_accum` > 1) uses `optax.MultiSteps`, whose counters live in the optimiser state
and are checkpointed with it.
"""

from __future__ import annotations

from typing import Any, Callable

import optax


def lr_schedule(cfg: Any) -> Callable:
    """Constant `lr` after an optional linear warmup of `warmup_steps` updates."""
    if cfg.warmup_steps > 0:
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps),
                                     optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])
    return optax.constant_schedule(cfg.lr)


def make_optimizer(cfg: Any) -> tuple[optax.GradientTransformation, Callable]:
    """(transformation, lr schedule) for `config.optim`.

    clip_by_global_norm(clip_norm) → adamw(b1, b2, eps, weight_decay); PyTorch AdamW decays every
    parameter (biases and norms included), so no decay mask is applied.
    """
    schedule = lr_schedule(cfg)
    parts = []
    if cfg.clip_norm and cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
    tx = optax.chain(*parts)
    if cfg.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
    return tx, schedule
