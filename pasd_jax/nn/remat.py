"""Per-block rematerialisation: named `jax.checkpoint` policies applied with `nn.remat`.

The UNet and ControlNet wrap every `ResnetBlock2D` and every `BasicTransformerBlock` in
`nn.remat(cls, policy=…)` when their `remat_policy` field is not "none" (maxtext's pattern of
named policies over `checkpoint_name` tags). Wrapping a class keeps the attribute names given in
`setup()`, so the parameter tree is identical for every policy. Inside a rematted block the
backward pass recomputes whatever the policy does not save:

  * "none": no remat (everything the backward needs is kept from the forward);
  * "full": nothing is saved inside a block; only block inputs are kept (least memory);
  * "dots": matmul / conv outputs without batch dimensions are saved, elementwise work, norms
    and the attention softmax are recomputed (`dots_with_no_batch_dims_saveable`);
  * "attention": only the attention cores' outputs (tag `ATTENTION_OUT`, the [B, T, H·D]
    result of softmax(q·kᵀ)·v) are saved, so the O(T²) score computation is never redone while
    the cheap projections, norms and convolutions are.

`checkpoint_name` tags are no-ops outside `jax.checkpoint`, so they cost nothing with "none".
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name

#: checkpoint_name of an attention core's output (see `pasd_jax.nn.attention.Attention`).
ATTENTION_OUT = "attention_out"

POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attention": jax.checkpoint_policies.save_only_these_names(ATTENTION_OUT),
}


def check_policy(policy: str) -> str:
    """`policy` if it names a policy; ValueError listing the known ones otherwise."""
    if policy not in POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; expected one of {', '.join(POLICIES)}")
    return policy


def remat_block(cls: type, policy: str) -> type:
    """`cls` itself for "none", else `nn.remat(cls)` with the named policy (same param names)."""
    if check_policy(policy) == "none":
        return cls
    return nn.remat(cls, policy=POLICIES[policy], prevent_cse=True)


def tag(x: jax.Array, name: str) -> jax.Array:
    """`checkpoint_name(x, name)`: marks a value a policy may save."""
    return checkpoint_name(x, name)
