"""Training state and the trainable/frozen split of the parameter tree.

The full parameter tree is `{"unet", "controlnet", "vae", "text_encoder"}` → Flax params. Paths are
written "component/module/…/leaf" (e.g. "unet/up_blocks_1/pixel_attentions_0/proj_out/kernel"), and
a leaf is trainable when any regex of `train.trainable` matches its path (`re.search`), mirroring
PASD's `--trainable_modules` substring test over `controlnet` + `unet` names (PASD_REFERENCE §8).
The split keeps the nested layout with empty branches pruned, so `merge(split(p))` is `p`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from pasd_jax.assembly import paths

SEP = paths.SEP


def flat(tree: Mapping) -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}."""
    return paths.flatten(tree, sep=SEP)


def nest(flat_tree: Mapping[str, Any]) -> dict:
    """{"a/b/c": leaf} -> nested dict."""
    return paths.unflatten(flat_tree, sep=SEP)


def trainable_mask(params: Mapping, patterns: Sequence[str]) -> dict[str, bool]:
    """{path: True if any pattern matches}."""
    regexes = [re.compile(p) for p in patterns]
    return {k: any(r.search(k) for r in regexes) for k in flat(params)}


def split(params: Mapping, patterns: Sequence[str]) -> tuple[dict, dict]:
    """(trainable, frozen) nested dicts whose leaves partition `params`.

    Raises:
      ValueError when nothing matches (a typo in `train.trainable` would silently train nothing).
    """
    mask = trainable_mask(params, patterns)
    if not any(mask.values()):
        raise ValueError(f"train.trainable {list(patterns)} matches no parameter")
    leaves = flat(params)
    return (nest({k: v for k, v in leaves.items() if mask[k]}),
            nest({k: v for k, v in leaves.items() if not mask[k]}))


def merge(trainable: Mapping, frozen: Mapping) -> dict:
    """Inverse of `split` (works on traced values inside jit)."""
    return nest({**flat(frozen), **flat(trainable)})


@flax.struct.dataclass
class TrainState:
    """What a step updates and a checkpoint saves.

    step: int32 scalar (number of updates applied); params: the trainable subtree (float32);
    opt_state: optax state over `params`; rng: the base PRNG key data (uint32 [2]); the step's key is
    `fold_in(key, step)`, so a resumed run draws the same noise as an uninterrupted one.
    """

    step: jnp.ndarray
    params: Any
    opt_state: Any
    rng: jnp.ndarray

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, seed: int) -> "TrainState":
        """Fresh state: step 0, `tx.init(params)`, key data of `jax.random.key(seed)`."""
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   rng=jax.random.key_data(jax.random.key(seed)))

    def step_key(self) -> jax.Array:
        """The typed PRNG key of this step."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def count_params(tree: Any) -> int:
    """Number of scalar parameters in a tree."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
