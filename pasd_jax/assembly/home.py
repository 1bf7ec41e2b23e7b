"""The models home: converted SD base models stored by name, and the PASD/base weight swap.

PASD's stylisation and old-photo results come from swapping the frozen SD base (UNet trunk, VAE,
text encoder) under a trained PASD: the reference does it by loading a personalised UNet folder
into a fresh PASD UNet, which leaves the PACA weights at random init (PASD_REFERENCE §7.9, §9.9).
Here a base is a converted pipeline folder stored under the models home, and `merge_base_unet`
takes every stock UNet weight from the base while keeping PASD's own weights (PACA
`pixel_attentions`, pasd_light `*_plus`) from the PASD checkpoint.

Layout (written by `python -m convert base SRC --name NAME`)::

    $PASD_JAX_HOME (default ~/.cache/pasd_jax)/
      bases/<name>/{unet,vae,text_encoder,tokenizer,scheduler}/, pasd_jax.json

No torch and no `convert` imports (the sampler imports this module).
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from pasd_jax.assembly import paths

HOME_ENV = "PASD_JAX_HOME"
DEFAULT_HOME = "~/.cache/pasd_jax"
BASES = "bases"
# Subfolders a converted base must have; `scheduler/` is optional (the PASD one is used otherwise).
BASE_PARTS = ("unet", "vae", "text_encoder", "tokenizer")
# Parameter-path parts that only PASD UNets have: PACA, and pasd_light's pixel-aware attention.
PASD_ONLY_PARTS = ("pixel_attentions", "proj_in_plus", "norm2_plus", "attn2_plus")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")


def models_home() -> pathlib.Path:
    """`$PASD_JAX_HOME`, or `~/.cache/pasd_jax` when unset or empty."""
    return pathlib.Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser()


def bases_dir() -> pathlib.Path:
    """`models_home()/bases`, where named bases live (may not exist yet)."""
    return models_home() / BASES


def check_base_name(name: str) -> str:
    """Return `name` if it is usable as a folder name under `bases/`, else raise ValueError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"invalid base name {name!r}: use letters, digits and . _ + - "
                         f"(starting with a letter or digit, at most 100 characters)")
    return name


def missing_base_parts(folder: str | os.PathLike) -> list[str]:
    """The required subfolders (`BASE_PARTS`) that `folder` lacks."""
    folder = pathlib.Path(folder)
    return [part for part in BASE_PARTS if not (folder / part).is_dir()]


def list_bases() -> list[str]:
    """Names of the complete bases stored under `bases_dir()`, sorted (hidden staging folders and
    incomplete folders are left out)."""
    root = bases_dir()
    if not root.is_dir():
        return []
    return sorted(entry.name for entry in root.iterdir()
                  if entry.is_dir() and not entry.name.startswith(".") and not missing_base_parts(entry))


def resolve_base(name_or_path: str | os.PathLike) -> pathlib.Path:
    """A base name or folder -> the converted pipeline folder holding that base.

    An existing directory is returned as is, once checked to have unet/, vae/, text_encoder/ and
    tokenizer/ (scheduler/ is optional). Anything else is a name under `bases_dir()`.

    Raises:
      FileNotFoundError: no such base; the message lists the stored ones and how to add one.
      ValueError: the folder exists but is not a complete converted pipeline.
    """
    path = pathlib.Path(os.fspath(name_or_path)).expanduser()
    if path.is_dir():
        missing = missing_base_parts(path)
        if missing:
            raise ValueError(f"{path} is not a converted base: it has no {', '.join(m + '/' for m in missing)} "
                             f"(a base is a converted SD pipeline: `python -m convert base SRC --name NAME`, "
                             f"or `python -m convert SRC DST` on a diffusers pipeline folder)")
        return path
    name = os.fspath(name_or_path)
    if _NAME.fullmatch(name):
        candidate = bases_dir() / name
        if candidate.is_dir() and not missing_base_parts(candidate):
            return candidate
    available = list_bases()
    listing = ", ".join(available) if available else "none"
    raise FileNotFoundError(f"no base model {name!r}: not a folder, and not stored under {bases_dir()} "
                            f"(available: {listing}); add one with `python -m convert base SRC --name NAME` "
                            f"(SRC: a single-file .safetensors/.ckpt checkpoint or a diffusers folder)")


# ---- the UNet swap -------------------------------------------------------------------------
def is_pasd_only(path: tuple[str, ...]) -> bool:
    """True for a UNet parameter path that stock SD has no counterpart for (PACA, `*_plus`)."""
    return any(part.startswith(PASD_ONLY_PARTS) for part in path)


def _listing(title: str, items: list[str], limit: int = 20) -> str:
    shown = "\n".join(f"    {item}" for item in items[:limit])
    more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}):\n{shown}{more}"


def merge_base_unet(pasd_unet_params: Mapping, base_unet_params: Mapping, *, what: str = "") -> dict:
    """PASD UNet params with every stock weight taken from a base SD UNet.

    Args:
      pasd_unet_params: nested Flax param dict of a PASD ("pasd" / "pasd_light") or stock UNet.
      base_unet_params: nested Flax param dict of a stock SD UNet of the same architecture.
      what: names the pair in error messages (e.g. "base majicmix vs runs/pasd").

    Returns:
      A new nested dict of numpy arrays with exactly the PASD tree's paths, shapes and dtypes:
      base values wherever the base has the leaf, PASD values for PACA / `*_plus` leaves (kept
      even when the base is itself a PASD model).

    Raises:
      ValueError listing the base leaves PASD lacks, shape mismatches, and the stock (non-PACA)
      PASD leaves the base does not provide: the two UNets have different architectures.
    """
    pasd, base = paths.flatten(pasd_unet_params), paths.flatten(base_unet_params)
    extra = ["/".join(p) for p in base if p not in pasd]
    mismatched = [f"{'/'.join(p)}: base {tuple(np.shape(v))}, PASD {tuple(np.shape(pasd[p]))}"
                  for p, v in base.items() if p in pasd and tuple(np.shape(v)) != tuple(np.shape(pasd[p]))]
    uncovered = ["/".join(p) for p in pasd if p not in base and not is_pasd_only(p)]
    if extra or mismatched or uncovered:
        parts = [f"base UNet and PASD UNet have different architectures{f' ({what})' if what else ''}; "
                 f"the base must be the SD version PASD was trained on:"]
        if extra:
            parts.append(_listing("in the base but not in PASD", sorted(extra)))
        if mismatched:
            parts.append(_listing("shape mismatch", sorted(mismatched)))
        if uncovered:
            parts.append(_listing("stock weights in PASD that the base lacks", sorted(uncovered)))
        raise ValueError("\n".join(parts))
    merged = {}
    for path, value in pasd.items():
        if path in base and not is_pasd_only(path):  # PACA / *_plus: always PASD's, even from a PASD "base"
            merged[path] = np.asarray(base[path]).astype(np.asarray(value).dtype, copy=False)
        else:
            merged[path] = np.asarray(value)
    return paths.unflatten(merged)
