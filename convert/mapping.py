"""Mechanical PyTorch state-dict -> Flax parameter-tree mapping (STYLE §2.4).

Every Flax module in `pasd_jax` is built with `setup()` attribute names equal to the PyTorch
attribute names, so a torch key maps to a Flax path by five uniform steps and no rename table:

1. split on "." and fold each integer part into the part before it
   (`down_blocks.0.resnets.1` -> `down_blocks_0/resnets_1`, `ff.net.2` -> `ff/net_2`);
2. take the leaf name from the *target* tree: torch `weight` becomes whichever of
   `kernel` / `scale` / `embedding` the Flax module has at that path;
3. transpose: Linear (out, in) -> (in, out); Conv2d OIHW -> HWIO;
4. cast to the target dtype;
5. check strictly: every target leaf filled, no source key left over, every shape equal.

The target tree is usually `jax.eval_shape(module.init, ...)["params"]`, so no memory is spent
on random weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np

from pasd_jax.assembly import paths

# Torch leaf name -> candidate Flax leaf names, in order of preference.
_LEAF_CANDIDATES = {
    "weight": ("kernel", "scale", "embedding"),
    "bias": ("bias",),
}

# Buffers some checkpoints carry that are not parameters (recomputed by our modules).
IGNORED_SOURCE_KEYS = (
    re.compile(r"(^|\.)position_ids$"),
)


# Torch attribute names that end in `_<digit>` but are not list indices (TimestepEmbedding).
_UNFOLDED_NAMES = frozenset({"linear_1", "linear_2"})


class ConversionError(ValueError):
    """A state dict does not fit the target parameter tree; the message lists every problem."""


def fold_key(torch_key: str) -> list[str]:
    """Split a torch key on '.' and fold integer parts into their predecessor.

    >>> fold_key("up_blocks.1.attentions.0.to_out.0.weight")
    ['up_blocks_1', 'attentions_0', 'to_out_0', 'weight']
    """
    parts: list[str] = []
    for part in torch_key.split("."):
        if part.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{part}"
        else:
            parts.append(part)
    return parts


def _to_flax_layout(array: np.ndarray, leaf: str, target_ndim: int) -> np.ndarray:
    """Transpose a torch tensor into the Flax layout of the target leaf."""
    if leaf == "kernel":
        if array.ndim == 4 and target_ndim == 4:  # Conv2d (O, I, kh, kw) -> (kh, kw, I, O)
            return np.transpose(array, (2, 3, 1, 0))
        if array.ndim == 2 and target_ndim == 2:  # Linear (out, in) -> (in, out)
            return np.transpose(array, (1, 0))
    return array


def from_flax_layout(array: np.ndarray, leaf: str) -> np.ndarray:
    """Inverse of `_to_flax_layout`: Flax kernel -> torch layout (a transposed view, no copy)."""
    if leaf == "kernel":
        if array.ndim == 4:
            return np.transpose(array, (3, 2, 0, 1))
        if array.ndim == 2:
            return np.transpose(array, (1, 0))
    return array


def _format_problems(title: str, items: Iterable[str], limit: int = 40) -> str:
    items = sorted(items)
    shown = "\n".join(f"    {item}" for item in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def _resolve_aliases(state_dict: Mapping[str, np.ndarray]) -> dict:
    """diffusers registers the down/upsampler conv twice (`conv` and the legacy `Conv2d_0`); a
    live `state_dict()` holds both, saved files usually one. Keep `conv`, read `Conv2d_0` as it."""
    resolved = {}
    for key, value in state_dict.items():
        if ".Conv2d_0." in key or key.startswith("Conv2d_0."):
            alias = key.replace("Conv2d_0.", "conv.")
            if alias in state_dict:
                continue
            key = alias
        resolved[key] = value
    return resolved


def torch_to_flax(state_dict: Mapping[str, np.ndarray], target: Mapping, *, what: str = "model") -> dict:
    """Map a torch state dict (numpy arrays, torch names) onto the Flax tree `target`.

    Args:
      state_dict: torch key -> array in PyTorch layout (any float dtype).
      target: nested dict of leaves with `.shape` and `.dtype` (e.g. `jax.ShapeDtypeStruct`).
      what: name used in error messages (a file path or component name).

    Returns:
      Nested dict of numpy arrays with exactly the target's paths, shapes and dtypes.

    Raises:
      ConversionError listing every missing, unexpected and shape-mismatched key.
    """
    target_flat = paths.flatten(target)
    state_dict = _resolve_aliases(state_dict)
    out: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, mismatched, mismatched_paths = [], [], set()
    for key, value in state_dict.items():
        if any(pattern.search(key) for pattern in IGNORED_SOURCE_KEYS):
            continue
        parts = fold_key(key)
        leaf_candidates = _LEAF_CANDIDATES.get(parts[-1], (parts[-1],))
        path = None
        for leaf in leaf_candidates:
            candidate = tuple(parts[:-1]) + (leaf,)
            if candidate in target_flat:
                path = candidate
                break
        if path is None:
            unexpected.append(key)
            continue
        if path in out or path in mismatched_paths:  # two torch keys folding onto one Flax path
            unexpected.append(f"{key} (maps onto {'/'.join(path)}, already filled by another key)")
            continue
        spec = target_flat[path]
        array = _to_flax_layout(np.asarray(value), path[-1], len(spec.shape))
        if tuple(array.shape) != tuple(spec.shape):
            mismatched.append(
                f"{key}: checkpoint {tuple(np.shape(value))} -> {tuple(array.shape)}, "
                f"model expects {tuple(spec.shape)} at {'/'.join(path)}"
            )
            mismatched_paths.add(path)
            continue
        out[path] = array.astype(np.dtype(spec.dtype), copy=False)
    missing = ["/".join(p) for p in target_flat if p not in out and p not in mismatched_paths]
    if unexpected or missing or mismatched:
        parts = [f"state dict of {what} does not match the model:"]
        if missing:
            parts.append(_format_problems("missing (model parameters with no checkpoint key)", missing))
        if unexpected:
            parts.append(_format_problems("unexpected (checkpoint keys the model does not have)", unexpected))
        if mismatched:
            parts.append(_format_problems("shape mismatch", mismatched))
        raise ConversionError("\n".join(parts))
    return paths.unflatten(out)


def flax_to_torch(params: Mapping) -> dict[str, np.ndarray]:
    """Inverse mapping: Flax tree -> torch-named state dict in PyTorch layout.

    Folded `name_N` parts are split back into `name.N` (except torch attribute names that
    themselves end in `_N`, listed in `_UNFOLDED_NAMES`); kernel/scale/embedding become `weight`.
    """
    state = {}
    for path, value in paths.flatten(params).items():
        state[torch_key(path)] = np.ascontiguousarray(from_flax_layout(np.asarray(value), path[-1]))
    return state


def torch_module_name(module_path: tuple[str, ...]) -> str:
    """Flax module path -> torch module name: `("down_blocks_0", "attentions_1", "proj_in")` ->
    `down_blocks.0.attentions.1.proj_in` (inverse of `fold_key`, `_UNFOLDED_NAMES` kept whole)."""
    torch_parts = []
    for part in module_path:
        match = re.fullmatch(r"(.+?)_(\d+)", part)
        if match and part not in _UNFOLDED_NAMES:
            torch_parts.extend([match.group(1), match.group(2)])
        else:
            torch_parts.append(part)
    return ".".join(torch_parts)


def torch_key(path: tuple[str, ...]) -> str:
    """Flax leaf path -> torch state-dict key (kernel/scale/embedding -> weight)."""
    leaf = "weight" if path[-1] in ("kernel", "scale", "embedding") else path[-1]
    return f"{torch_module_name(path[:-1])}.{leaf}" if len(path) > 1 else leaf
