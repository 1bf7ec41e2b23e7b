"""Fresh weights for the parts PASD adds or trains from scratch: seeded init, zero convolutions.

PASD training starts its new weights (PACA `pixel_attentions`, pasd_light `*_plus`, the DR net)
from a fresh init while everything else comes from the SD base (`train.checkpoint`), and
ControlNet's zero convolutions start at 0 (PASD_REFERENCE §6, §8). The smoke model
(`pasd_jax.fixtures.tiny`) takes all its weights from here.

    params = init_params(config, seed)   # config: a component config.json dict
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from pasd_jax.assembly import paths, registry

#: Parameter paths of ControlNet's zero convolutions (start at 0).
ZERO_INIT = re.compile(r"controlnet_down_blocks|controlnet_mid_block|controlnet_cond_embedding/conv_out")


def init_params(config: Mapping[str, Any], seed: int) -> dict:
    """Seeded random weights for one component, as numpy arrays (no XLA compile: seconds on a CPU).

    Shapes come from `jax.eval_shape` of the module's init; kernels and embeddings are
    N(0, 1/fan_in) (LeCun-normal-like), biases 0, norm scales 1. PASD's zero convolutions
    (`controlnet_down_blocks`, `controlnet_mid_block`, `controlnet_cond_embedding/conv_out`) stay 0.
    """
    abstract = registry.abstract_params(registry.build_module(config))
    rng = np.random.default_rng(seed)

    def leaf(path, spec):
        name = paths.key_path_str(path)
        last = name.rsplit(paths.SEP, 1)[-1]
        if last in ("bias", "scale") or ZERO_INIT.search(name):
            return np.full(spec.shape, 1.0 if last == "scale" else 0.0, np.float32)
        fan_in = int(np.prod(spec.shape[:-1])) if last == "kernel" else spec.shape[-1]
        return (rng.standard_normal(spec.shape) / np.sqrt(max(fan_in, 1))).astype(np.float32)

    return jax.tree_util.tree_map_with_path(leaf, abstract)
