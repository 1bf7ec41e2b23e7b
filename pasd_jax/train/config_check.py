"""Checks of a training config before anything is created or loaded (one clear error each).

`check_overrides` finds `--config.FIELD` names that are not fields of the config (with a
did-you-mean); `validate` checks values: choices (model family, data source/mode/degrade_on, dtypes, remat
policy), positive counts, and that the data and base exist (folders present and holding images,
array_record files present, a converted base with its parts). Every problem raises `ConfigError`
whose message names the field (`config.data.paths`) and what is wrong; `train.py` prints it as one
`error:` line and exits 2 (README "Training").
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

DTYPE_NAMES = ("float32", "bfloat16")
FAMILIES = ("pasd", "pasd_light")
SOURCES = ("folders", "array_record", "tfds")
MODES = ("realesrgan", "grayscale")
DEGRADE_ON = ("host", "device")
BASE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class ConfigError(ValueError):
    """A config or command-line mistake the user must fix (exit status 2)."""


def field_names(config: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of every field, sub-dicts included ("data", "data.paths", …)."""
    names = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        names.append(name)
        if isinstance(value, Mapping) or hasattr(value, "items") and not isinstance(value, (str, bytes)):
            names.extend(field_names(value, name + "."))
    return names


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """' (did you mean config.X?)' for the closest known name, or ''."""
    known = list(known)
    leaf = name.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if not close:  # a right leaf under the wrong parent: `--config.paths` for `data.paths`
        close = [k for k in known if k.rsplit(".", 1)[-1] == leaf][:1]
    if not close:
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in known}
        leaf_close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
        close = [by_leaf[leaf_close[0]]] if leaf_close else []
    return f" (did you mean config.{close[0]}?)" if close else ""


def override_names(argv: Sequence[str], flag: str = "config") -> list[str]:
    """The FIELD of every `--config.FIELD[=VALUE]` argument."""
    out = []
    for arg in argv:
        for dashes in ("--", "-"):
            head = f"{dashes}{flag}."
            if arg.startswith(head):
                out.append(arg[len(head):].split("=", 1)[0])
                break
    return out


def check_overrides(config: Mapping[str, Any], argv: Sequence[str]) -> None:
    """ConfigError for the first `--config.FIELD` that names no field of `config`."""
    known = field_names(config)
    for name in override_names(argv):
        if name not in known:
            raise ConfigError(f"--config.{name}: no such config field{did_you_mean(name, known)}; "
                              f"`python train.py --config FILE --print_config` lists the fields")


def _choice(value: Any, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"config.{name}={value!r} is not one of {', '.join(choices)}")


def _positive(config: Any, names: Iterable[str], *, zero_ok: Sequence[str] = ()) -> None:
    for name in names:
        node = config
        for part in name.split("."):
            node = node[part]
        low = 0 if name in zero_ok else 1
        if not isinstance(node, int) or isinstance(node, bool) or node < low:
            raise ConfigError(f"config.{name}={node!r} must be an integer ≥ {low}")


def _check_data(data: Any) -> None:
    paths = data.paths
    if isinstance(paths, str):
        paths = (paths,)
    if data.source in ("folders", "array_record") and not paths:
        raise ConfigError(f"config.data.paths is empty: give the training {'image folders' if data.source == 'folders' else 'array_record files'}, "
                          "e.g. --config.data.paths='(\"data/hq\",)'")
    if data.source == "folders":
        from pasd_jax.imaging.io import IMAGE_EXTENSIONS

        for folder in paths:
            if not os.path.isdir(folder):
                raise ConfigError(f"config.data.paths: {folder!r} is not a folder")
            if not _has_image(folder, IMAGE_EXTENSIONS):
                raise ConfigError(f"config.data.paths: no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder!r}")
    elif data.source == "array_record":
        for path in paths:
            if not os.path.isfile(path):
                raise ConfigError(f"config.data.paths: array_record file {path!r} not found")
    elif data.source == "tfds":
        if not data.tfds_name:
            raise ConfigError("config.data.tfds_name is empty (data.source='tfds' needs a prepared dataset name)")
        from pasd_jax.data.tfds_source import dataset_dir

        try:
            dataset_dir(data.tfds_name, data.get("tfds_data_dir", ""))
        except FileNotFoundError as err:
            raise ConfigError(f"config.data.tfds_name: {err}") from err


def _has_image(folder: str, extensions: Sequence[str]) -> bool:
    for _, _, files in os.walk(folder):
        if any(os.path.splitext(f)[1].lower() in extensions for f in files):
            return True
    return False


def _check_base(config: Any) -> None:
    if config.base == "tiny":
        return
    if not config.base:
        raise ConfigError("config.base is empty: a converted SD1.5 pipeline folder (`python -m convert "
                          "SD15_DIR weights/sd15`, then --config.base=weights/sd15), or 'tiny'")
    if not os.path.isdir(config.base):
        raise ConfigError(f"config.base: {config.base!r} is not a folder")
    missing = [p for p in BASE_PARTS if not os.path.isdir(os.path.join(config.base, p))]
    if missing:
        raise ConfigError(f"config.base: {config.base!r} lacks {', '.join(missing)}/ (not a converted pipeline "
                          f"folder; convert one with `python -m convert`)")
    if config.init_from and not os.path.isdir(config.init_from):
        raise ConfigError(f"config.init_from: {config.init_from!r} is not a folder")


def validate(config: Any) -> None:
    """ConfigError for the first problem in `config` (see module doc); touches no workdir."""
    from pasd_jax.nn.remat import POLICIES

    if config.get("method", "pasd") != "pasd":  # configs/stablesr.py: its step exists, the loop does not yet
        raise ConfigError(f"config.method={config.method!r}: train.py trains PASD only so far; the StableSR "
                          "step is pasd_jax.train.stablesr_step.train_step (tested), not yet driven by this loop")
    _choice(config.model.family, "model.family", FAMILIES)
    _choice(config.data.source, "data.source", SOURCES)
    _choice(config.data.mode, "data.mode", MODES)
    _choice(config.data.get("degrade_on", "host"), "data.degrade_on", DEGRADE_ON)
    if config.data.get("degrade_on", "host") == "device" and config.data.mode != "realesrgan":
        raise ConfigError(f"config.data.degrade_on='device' degrades Real-ESRGAN style only; "
                          f"data.mode={config.data.mode!r} needs data.degrade_on='host'")
    _choice(config.dtype.compute, "dtype.compute", DTYPE_NAMES)
    _choice(config.dtype.vae_compute, "dtype.vae_compute", DTYPE_NAMES)
    if "frozen_params" in config.dtype:
        _choice(config.dtype.frozen_params, "dtype.frozen_params", DTYPE_NAMES)
    _choice(config.train.remat_policy, "train.remat_policy", tuple(POLICIES))
    _positive(config, ("train.total_steps", "train.log_every", "train.ckpt_every", "train.keep_checkpoints",
                       "data.resolution", "data.batch_per_device", "optim.grad_accum", "data.global_batch",
                       "train.validate_every", "data.num_workers"),
              zero_ok=("data.global_batch", "train.validate_every", "data.num_workers"))
    if config.data.resolution % 8:
        raise ConfigError(f"config.data.resolution={config.data.resolution} must be a multiple of 8 (the VAE's "
                          f"downscale)")
    if not config.train.trainable:
        raise ConfigError("config.train.trainable is empty: nothing would be trained")
    if not (config.optim.lr > 0):
        raise ConfigError(f"config.optim.lr={config.optim.lr!r} must be > 0")
    _check_base(config)
    _check_data(config.data)
