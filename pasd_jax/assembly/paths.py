"""Parameter-tree paths: the one flatten / unflatten helper of the code base.

A Flax parameter tree is a nested dict (`{"down_blocks_0": {"resnets_0": {"conv1": {"kernel": a}}}}`).
Flat forms key each leaf by its path, either as a tuple of parts (`("down_blocks_0", …, "kernel")`,
`sep=None`) or as the parts joined with a separator (`"down_blocks_0/resnets_0/conv1/kernel"`,
`sep="/"`, what `flax_params.safetensors` and orbax masks use). Empty sub-dicts have no leaves
and vanish, as in `flax.traverse_util.flatten_dict`. `key_path_str` names a `jax.tree_util`
key path (from `tree_map_with_path`) the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

SEP = "/"


def flatten(tree: Mapping, sep: Optional[str] = None) -> dict:
    """Nested mapping -> {path: leaf}; path is a tuple of str parts, or the parts joined by `sep`.

    With a `sep`, a key that is empty or contains `sep` raises ValueError (it could not be split back).
    """
    flat: dict = {}

    def walk(node: Mapping, prefix: tuple) -> None:
        for key, value in node.items():
            key = str(key)
            if sep is not None and (not key or sep in key):
                raise ValueError(f"parameter name {sep.join(prefix + (key,))!r} is empty or contains {sep!r}")
            if isinstance(value, Mapping):
                walk(value, prefix + (key,))
            else:
                flat[prefix + (key,) if sep is None else sep.join(prefix + (key,))] = value

    walk(tree, ())
    return flat


def unflatten(flat: Mapping[Any, Any], sep: Optional[str] = None) -> dict:
    """{path: leaf} -> nested dict; paths are tuples, or strings split on `sep`."""
    tree: dict = {}
    for path, value in flat.items():
        parts = tuple(path) if sep is None else path.split(sep)
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def key_path_str(path, sep: str = SEP) -> str:
    """A `jax.tree_util` key path (DictKey / GetAttrKey / SequenceKey entries) -> "a/b/0"."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return sep.join(parts)


def leaves(tree: Mapping):
    """The leaves of a nested mapping, in insertion order."""
    return flatten(tree).values()
