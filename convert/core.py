"""Convert diffusers/transformers component folders (PyTorch weights) into converted Flax folders.

The torch-side counterpart is `ModelMixin.from_pretrained(folder)` / `save_pretrained`: a folder
with `config.json` + weights becomes a folder with `config.json` + `flax_params.safetensors`
(`pasd_jax.assembly.weights`). Per component:

    config.json -> registry.detect_component -> (UNet: family from the checkpoint keys)
    weights     -> torch_io.load_component_weights -> registry.prepare_state_dict
    module      -> registry.build_module -> registry.abstract_params (no memory for weights)
    mapping.torch_to_flax (strict) -> weights.save_converted (atomic)

A folder of components (a diffusers pipeline with `model_index.json`, or a PASD training
`checkpoint-N/` with `unet/` + `controlnet/`) converts every supported subfolder and copies
`tokenizer/` and `scheduler/` as they are, all staged in a temporary folder renamed at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from convert import torch_io
from convert.mapping import torch_to_flax
from pasd_jax.assembly import registry, weights

COPIED_SUBFOLDERS = ("tokenizer", "scheduler")


class NonFiniteWeightsWarning(RuntimeWarning):
    """A checkpoint holds NaN or Inf values (converted as they are)."""


@dataclasses.dataclass(frozen=True)
class ComponentReport:
    """What `convert_component` did."""

    name: str  # component kind: "unet", "vae", "text_encoder" or "controlnet"
    family: str | None  # UNet family ("stock", "pasd", "pasd_light"); None for other components
    num_params: int
    src: str
    dst: str
    seconds: float

    def describe(self) -> str:
        kind = f"{self.family} {self.name}" if self.family else self.name
        return f"{kind}: {format_count(self.num_params)} parameters, {self.src} -> {self.dst} ({self.seconds:.1f} s)"


def format_count(n: int) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def read_config(folder: str) -> dict:
    """`folder/config.json` as a dict, with errors that say what kind of folder was expected."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} does not exist or is not a folder")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no config.json; expected a diffusers or transformers component folder")
    try:
        with open(path) as f:
            config = json.load(f)
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return config


def non_finite_keys(state_dict: Mapping[str, np.ndarray]) -> list[str]:
    """Keys of floating-point tensors that contain NaN or Inf."""
    bad = []
    for key, value in state_dict.items():
        if value.dtype.kind in "biu":
            continue
        if not np.isfinite(value.astype(np.float32, copy=False)).all():
            bad.append(key)
    return sorted(bad)


@functools.lru_cache(maxsize=16)
def _abstract_params_cached(config_json: str) -> dict:
    return registry.abstract_params(registry.build_module(json.loads(config_json)))


def abstract_params_for(config: Mapping[str, Any]) -> dict:
    """`registry.abstract_params` of the module a config builds, memoised per config: tracing a
    UNet's init takes seconds, and pipelines / tests convert the same architecture repeatedly."""
    return _abstract_params_cached(json.dumps(config, sort_keys=True, default=str))


def convert_state_dict(config: Mapping[str, Any], state_dict: Mapping[str, np.ndarray], *,
                       what: str) -> tuple[str, dict, dict]:
    """(component config, torch state dict) -> (component name, config to save, Flax params).

    The saved config is the source config, plus `_pasd_family` for a UNet. `what` names the
    source in warnings and errors. Raises `convert.mapping.ConversionError` on any mismatch.
    """
    component = registry.detect_component(config)
    config = dict(config)
    if component == "unet":
        config[registry.FAMILY_KEY] = registry.detect_unet_family(state_dict)
    bad = non_finite_keys(state_dict)
    if bad:
        warnings.warn(f"{what}: {len(bad)} tensors contain NaN or Inf: {', '.join(bad[:10])}"
                      f"{' ...' if len(bad) > 10 else ''}", NonFiniteWeightsWarning, stacklevel=2)
    registry.build_module(config)  # unsupported configs fail here, before the (cached) trace
    state_dict = registry.prepare_state_dict(component, state_dict)
    params = torch_to_flax(state_dict, abstract_params_for(config), what=what)
    return component, config, params


def convert_component(src_folder: str | os.PathLike, dst_folder: str | os.PathLike, *,
                      overwrite: bool = False, variant: str | None = None) -> ComponentReport:
    """Convert one diffusers/transformers component folder into a converted Flax folder.

    Raises:
      FileNotFoundError: no config.json or no weights file in `src_folder`.
      FileExistsError: `dst_folder` exists and `overwrite` is False (or it is not ours).
      ValueError: unsupported config, unreadable/unsafe checkpoint (`CheckpointReadError`), or
        keys/shapes that do not fit the model (`ConversionError`, listing every problem).
    """
    start = time.perf_counter()
    src, dst = os.fspath(src_folder), os.fspath(dst_folder)
    config = read_config(src)
    registry.detect_component(config)  # fail on an unsupported folder before reading weights
    weights.check_destination(dst, overwrite)
    weights_path = torch_io.find_weights_file(src, variant)
    state_dict = torch_io.load_component_weights(src, variant)
    component, config, params = convert_state_dict(config, state_dict, what=weights_path)
    del state_dict
    weights.save_converted(dst, config, params, component=component, overwrite=overwrite)
    num_params = sum(int(np.size(p)) for p in weights.flatten_params(params).values())
    return ComponentReport(component, config.get(registry.FAMILY_KEY), num_params, src, dst,
                           time.perf_counter() - start)


def is_component_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "config.json"))


def component_subfolders(folder: str) -> list[str]:
    """Supported component subfolders present in a pipeline / checkpoint folder, in a fixed order."""
    return [name for name in registry.COMPONENTS if os.path.isdir(os.path.join(folder, name))]


def is_multi_component_folder(folder: str) -> bool:
    """A diffusers pipeline (`model_index.json`) or a folder with unet/vae/text_encoder/controlnet."""
    return os.path.isfile(os.path.join(folder, "model_index.json")) or bool(component_subfolders(folder))


def convert_pipeline(src_folder: str | os.PathLike, dst_folder: str | os.PathLike, *, overwrite: bool = False,
                     variant: str | None = None,
                     on_component: Callable[[str], Any] | None = None) -> list[ComponentReport]:
    """Convert every supported component subfolder of `src_folder` into `dst_folder/<name>`.

    `tokenizer/` and `scheduler/` are copied as they are, `model_index.json` too, and a
    `pasd_jax.json` manifest lists what was converted. All-or-nothing: the result is staged beside
    `dst_folder` and renamed into place only when every component succeeded.
    `on_component(name)` is called before each component (progress display).
    """
    src, dst = os.fspath(src_folder), os.fspath(dst_folder)
    names = component_subfolders(src)
    if not names:
        raise FileNotFoundError(f"{src} has no config.json and none of the component subfolders "
                                f"{', '.join(registry.COMPONENTS)}; expected a diffusers or transformers "
                                f"component folder, a diffusers pipeline, or a PASD checkpoint-N folder")
    reports = []
    with weights.staged_folder(dst, overwrite=overwrite) as staged:
        for name in names:
            if on_component is not None:
                on_component(name)
            report = convert_component(os.path.join(src, name), os.path.join(staged, name), variant=variant)
            reports.append(dataclasses.replace(report, dst=os.path.join(dst, name)))
        copied = [n for n in COPIED_SUBFOLDERS if os.path.isdir(os.path.join(src, n))]
        for name in copied:
            shutil.copytree(os.path.join(src, name), os.path.join(staged, name))
        if os.path.isfile(os.path.join(src, "model_index.json")):
            shutil.copy2(os.path.join(src, "model_index.json"), os.path.join(staged, "model_index.json"))
        weights.write_manifest(staged, {
            "format_version": weights.FORMAT_VERSION, "source": os.path.abspath(src),
            "components": {r.name: {"family": r.family, "num_params": r.num_params} for r in reports},
            "copied": copied})
    return reports


def skipped_subfolders(folder: str) -> list[str]:
    """Subfolders of a pipeline that are neither converted nor copied (safety_checker, ...)."""
    kept = set(registry.COMPONENTS) | set(COPIED_SUBFOLDERS)
    return sorted(n for n in os.listdir(folder)
                  if os.path.isdir(os.path.join(folder, n)) and n not in kept and not n.startswith("."))


def convert_folder(src_folder: str | os.PathLike, dst_folder: str | os.PathLike, *, overwrite: bool = False,
                   variant: str | None = None,
                   on_component: Callable[[str], Any] | None = None) -> list[ComponentReport]:
    """`convert_component` for a component folder, `convert_pipeline` for a folder of components."""
    src, dst = os.fspath(src_folder), os.fspath(dst_folder)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src} does not exist or is not a folder")
    if os.path.realpath(src) == os.path.realpath(dst):
        raise ValueError(f"source and destination are the same folder ({src}); choose another destination")
    if is_component_folder(src):
        if on_component is not None:
            on_component(os.path.basename(os.path.normpath(src)))
        return [convert_component(src, dst, overwrite=overwrite, variant=variant)]
    if is_multi_component_folder(src):
        return convert_pipeline(src, dst, overwrite=overwrite, variant=variant, on_component=on_component)
    read_config(src)  # raises the "has no config.json" error
    raise AssertionError("unreachable")
