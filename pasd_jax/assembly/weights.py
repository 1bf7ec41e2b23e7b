"""Converted-model folders: `config.json` + `flax_params.safetensors`, readable without torch.

The Flax counterpart of a diffusers component folder (`config.json` +
`diffusion_pytorch_model.safetensors`), written by `python -m convert`:

* `config.json`: the source diffusers/transformers config, plus our own key
  `"_pasd_jax": {"format_version": 1, "component": "unet" | "vae" | "text_encoder" | "controlnet"}`
  (the UNet config also carries `"_pasd_family"`);
* `flax_params.safetensors`: the Flax parameter tree, paths joined with "/", e.g.
  `down_blocks_0/resnets_0/conv1/kernel`, arrays in Flax layout.

Writes are atomic: everything goes to a temporary sibling folder that is renamed into place at
the end, so an interrupted save leaves no `dst`, and `overwrite=True` swaps a whole folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from pasd_jax.assembly import paths

CONFIG_NAME = "config.json"
PARAMS_NAME = "flax_params.safetensors"
MANIFEST_NAME = "pasd_jax.json"  # top-level marker of a converted multi-component folder
META_KEY = "_pasd_jax"
FORMAT_VERSION = 1


def flatten_params(params: Mapping) -> dict[str, np.ndarray]:
    """Nested param dict -> {"a/b/kernel": contiguous numpy array} (`paths.flatten` with "/")."""
    return {path: np.ascontiguousarray(np.asarray(value))
            for path, value in paths.flatten(params, sep=paths.SEP).items()}


def unflatten_params(flat: Mapping[str, Any]) -> dict:
    """{"a/b/kernel": array} -> nested dict."""
    return paths.unflatten(flat, sep=paths.SEP)


def is_converted_folder(path: str | os.PathLike) -> bool:
    """True for a folder this module (or the converter) wrote, or an empty folder."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return False
    if not os.listdir(path) or os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        return True
    try:
        with open(os.path.join(path, CONFIG_NAME)) as f:
            return META_KEY in json.load(f)
    except (OSError, ValueError, TypeError):
        return False


def check_destination(dst: str | os.PathLike, overwrite: bool) -> None:
    """Raise unless `dst` may be (re)written: absent, or a converted folder and `overwrite`.

    A folder we did not write is never replaced, even with `overwrite=True`.
    """
    dst = os.fspath(dst)
    if not os.path.lexists(dst):
        check_creatable(dst)
        return
    if not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    if not is_converted_folder(dst):
        raise FileExistsError(f"refusing to overwrite {dst}: it is not a folder written by the pasd_jax "
                              f"converter (no {CONFIG_NAME} with {META_KEY!r}, no {MANIFEST_NAME})")


def check_creatable(dst: str) -> None:
    """Raise ValueError naming `dst` when its nearest existing ancestor is a file or not writable."""
    anchor = os.path.dirname(os.path.abspath(dst))
    while not os.path.lexists(anchor) and os.path.dirname(anchor) != anchor:
        anchor = os.path.dirname(anchor)
    if not os.path.isdir(anchor):
        raise ValueError(f"cannot create {dst}: {anchor} is a file, not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot create {dst}: folder {anchor} is not writable")


def staging_dir(dst: str | os.PathLike) -> str:
    """A fresh temporary folder beside `dst` (same filesystem, so the final rename is atomic)."""
    dst = os.path.abspath(os.fspath(dst))
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    staged = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial-", dir=parent)
    os.chmod(staged, 0o777 & ~_umask())  # mkdtemp makes it 0700; the result should look like mkdir's
    return staged


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def commit_dir(staged: str, dst: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Move the finished `staged` folder to `dst`; with `overwrite`, swap out the old `dst`.

    The old folder is first renamed aside, then `staged` renamed in, then the old one deleted;
    if the second rename fails the old folder is put back.
    """
    dst = os.path.abspath(os.fspath(dst))
    check_destination(dst, overwrite)
    if not os.path.lexists(dst):
        os.rename(staged, dst)
        return
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=os.path.dirname(dst))
    os.rmdir(aside)
    os.rename(dst, aside)
    try:
        os.rename(staged, dst)
    except BaseException:
        os.rename(aside, dst)
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(dst: str | os.PathLike, *, overwrite: bool = False):
    """Context manager yielding a temporary folder beside `dst`: fill it, and on a clean exit it
    replaces `dst` atomically (`commit_dir`); on any error it is deleted and `dst` is untouched."""
    check_destination(dst, overwrite)
    staged = staging_dir(dst)
    try:
        yield staged
        commit_dir(staged, dst, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def write_manifest(folder: str | os.PathLike, manifest: Mapping[str, Any]) -> None:
    """Write `folder/pasd_jax.json`, the marker of a converted multi-component folder."""
    with open(os.path.join(os.fspath(folder), MANIFEST_NAME), "w") as f:
        json.dump(dict(manifest), f, indent=2, sort_keys=True)
        f.write("\n")


def save_converted(dst: str | os.PathLike, config: Mapping[str, Any], params: Mapping, *,
                   component: str | None = None, overwrite: bool = False) -> None:
    """Write `dst/config.json` and `dst/flax_params.safetensors` atomically.

    Args:
      dst: folder to create; must not exist unless `overwrite` (then only a converted folder).
      config: the source config dict (JSON-serialisable); `_pasd_jax` metadata is added.
      params: nested dict of arrays (numpy or jax), Flax layout.
      component: "unet", "vae", "text_encoder" or "controlnet", recorded in the metadata.
    """
    check_destination(dst, overwrite)
    config = dict(config)
    config[META_KEY] = {"format_version": FORMAT_VERSION, **({"component": component} if component else {})}
    flat = flatten_params(params)
    staged = staging_dir(dst)
    try:
        with open(os.path.join(staged, CONFIG_NAME), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        save_file(flat, os.path.join(staged, PARAMS_NAME), metadata={"format": "flax"})
        os.chmod(os.path.join(staged, PARAMS_NAME), 0o666 & ~_umask())  # safetensors writes 0600
        commit_dir(staged, dst, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


def load_converted(src: str | os.PathLike) -> tuple[dict, dict]:
    """Read a converted folder -> (config dict, nested dict of numpy arrays).

    Raises:
      FileNotFoundError naming the missing folder or file.
      ValueError when the config is not JSON or was written by a newer format version.
    """
    src = os.fspath(src)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"converted model folder not found: {src}")
    config_path, params_path = os.path.join(src, CONFIG_NAME), os.path.join(src, PARAMS_NAME)
    for path in (config_path, params_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{src} has no {os.path.basename(path)}; expected a folder written by "
                                    f"`python -m convert` (a diffusers folder must be converted first)")
    config = read_config(config_path)
    meta = config.get(META_KEY, {})
    version = meta.get("format_version", FORMAT_VERSION) if isinstance(meta, Mapping) else FORMAT_VERSION
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{src} was written by a newer converter (format {version}; this reads {FORMAT_VERSION})")
    return config, unflatten_params(read_params(params_path))


def read_config(path: str | os.PathLike) -> dict:
    """A `config.json` -> dict; ValueError naming the file when it is unreadable, not JSON or not an object."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); reconvert with `python -m convert`") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror or err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def read_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """`flax_params.safetensors` -> flat {"a/b/kernel": array}; ValueError naming the file when it is
    truncated, corrupt or unreadable (safetensors' own errors name no file)."""
    path = os.fspath(path)
    try:
        return load_file(path)
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror or err})") from None
    except SafetensorError as err:  # bad header / sizes; not an OSError, and it names no file
        reason = str(err) or type(err).__name__
        raise ValueError(f"{path}: not a readable safetensors file ({reason}); the file is truncated or "
                         f"corrupt — reconvert with `python -m convert`") from None
