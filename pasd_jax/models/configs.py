"""Reading diffusers / transformers `config.json` dicts into Flax module fields.

Module fields are named after the config keys (`block_out_channels`, `layers_per_block`, …), so
building a module is: check unsupported options, keep the keys that are fields, turn lists into
tuples (Flax module fields must be hashable), and resolve the per-block values the way diffusers
does (`attention_head_dim` is the head *count* in SD configs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, Sequence


#: Recorded in converted UNet configs ("stock" / "pasd" / "pasd_light"); diffusers configs never say it.
FAMILY_KEY = "_pasd_family"


class UnsupportedConfigError(ValueError):
    """A config asks for a model feature this port does not implement."""


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def check_supported(config: Mapping[str, Any], rules: Mapping[str, Callable[[Any], bool]], what: str) -> None:
    """Raise `UnsupportedConfigError` naming every key whose value fails its rule.

    `rules` maps a config key to a predicate on its value; absent keys are not checked.
    """
    bad = [f"{key}={config[key]!r}" for key, ok in rules.items() if key in config and not ok(config[key])]
    if bad:
        raise UnsupportedConfigError(f"{what}: unsupported config value(s): {', '.join(bad)}")


def module_kwargs(module_cls: type, config: Mapping[str, Any], **overrides: Any) -> dict:
    """Keep the config keys that are fields of `module_cls` (lists -> tuples), then apply overrides."""
    names = {f.name for f in dataclasses.fields(module_cls)} - {"parent", "name"}
    kwargs = {k: _freeze(v) for k, v in config.items() if k in names and v is not None}
    kwargs.update(overrides)
    return kwargs


def per_block(value: Any, n: int) -> tuple:
    """Broadcast an int/bool/None config value to a per-block tuple of length n."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UnsupportedConfigError(f"per-block value {value!r} does not have {n} entries")
        return tuple(value)
    return (value,) * n


def is_none(value: Any) -> bool:
    return value is None


def one_of(*allowed: Any) -> Callable[[Any], bool]:
    return lambda value: value in allowed


def all_in(allowed: Sequence[Any]) -> Callable[[Any], bool]:
    return lambda value: all(v in allowed for v in value)
