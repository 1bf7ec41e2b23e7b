"""Export converted (or trained) Flax folders back to PyTorch diffusers folders.

The inverse of `convert.core`: a converted component folder (`config.json` +
`flax_params.safetensors`) becomes what diffusers' `save_pretrained` writes
(`config.json` + `diffusion_pytorch_model.safetensors`, or `model.safetensors` for the
transformers text encoder), with `convert.mapping.flax_to_torch` names and layouts, so
`UNet2DConditionModel.from_pretrained(DST/unet)` (or PASD's own UNet class for PACA weights) loads
it. torch -> ours -> torch is exact for float32 weights. A pipeline folder exports every
component, copies tokenizer/ and scheduler/, and writes a `model_index.json`; with a base
(`--base`), the UNet's stock weights, the VAE and the text encoder come from the base
(`pasd_jax.assembly.home.merge_base_unet`), the ControlNet and PACA weights from the PASD folder.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

from convert.mapping import from_flax_layout, torch_key
from convert.safetensors_writer import write_safetensors
from pasd_jax.assembly import home, paths, registry, weights

EXPORT_MARKER = "pasd_jax_export.json"  # lets --overwrite replace a folder this module wrote
WEIGHT_FILES = {"text_encoder": "model.safetensors"}  # transformers; diffusers components otherwise
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
_LIBRARIES = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
              "text_encoder": ("transformers", "CLIPTextModel"), "controlnet": ("diffusers", "ControlNetModel"),
              "tokenizer": ("transformers", "CLIPTokenizer")}


def torch_state(params: Mapping) -> dict:
    """Flax tree -> torch-named state dict of (possibly strided) views; no copies."""
    return {torch_key(path): from_flax_layout(value, path[-1]) for path, value in paths.flatten(params).items()}


def torch_config(config: Mapping[str, Any]) -> dict:
    """A converted config without our metadata (`_pasd_family` stays: diffusers ignores `_` keys)."""
    return {k: v for k, v in config.items() if k != weights.META_KEY}


def write_component(folder: str, component: str, config: Mapping[str, Any], params: Mapping) -> None:
    """Write one PyTorch component folder (config.json + safetensors) into `folder`."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(torch_config(config), f, indent=2, sort_keys=True)
        f.write("\n")
    write_safetensors(os.path.join(folder, WEIGHT_FILES.get(component, DIFFUSERS_WEIGHTS)), torch_state(params),
                      metadata={"format": "pt"})


def check_export_destination(dst: str, overwrite: bool) -> None:
    if not os.path.lexists(dst):
        weights.check_creatable(dst)  # a path under a regular file or an unwritable folder: one line now
        return
    if not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
    if not (os.path.isdir(dst) and (not os.listdir(dst) or os.path.isfile(os.path.join(dst, EXPORT_MARKER)))):
        raise FileExistsError(f"refusing to overwrite {dst}: it is not a folder written by `python -m convert export`")


def export_folder(src: str | os.PathLike, dst: str | os.PathLike, *, base: str | os.PathLike | None = None,
                  overwrite: bool = False, on_component: Callable[[str], Any] | None = None) -> list[str]:
    """Export a converted component or pipeline folder to a PyTorch diffusers folder at `dst`.

    Returns the exported component names. Atomic (staged beside `dst`, renamed at the end).
    Raises FileNotFoundError / ValueError for folders that are not converted, or a base whose
    UNet architecture differs from the PASD UNet's.
    """
    src, dst = os.fspath(src), os.path.abspath(os.fspath(dst))
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src} does not exist or is not a folder")
    single = os.path.isfile(os.path.join(src, weights.CONFIG_NAME))
    names = [] if single else [n for n in registry.COMPONENTS if os.path.isdir(os.path.join(src, n))]
    if not single and not names:
        raise FileNotFoundError(f"{src} is neither a converted component folder (config.json + "
                                f"{weights.PARAMS_NAME}) nor a converted pipeline (unet/, vae/, ...)")
    if single and base is not None:
        raise ValueError("--base needs a converted pipeline folder (with unet/), not a single component")
    base_dir = os.fspath(home.resolve_base(base)) if base is not None else None
    check_export_destination(dst, overwrite)
    staged = weights.staging_dir(dst)
    try:
        if single:
            config, params = weights.load_converted(src)
            component = registry.detect_component(config)
            if on_component:
                on_component(component)
            write_component(staged, component, config, params)
            names = [component]
        else:
            if base_dir is not None:
                names = sorted(set(names) | {"vae", "text_encoder"}, key=registry.COMPONENTS.index)
            for name in names:
                if on_component:
                    on_component(name)
                from_base = base_dir is not None and name in ("vae", "text_encoder")
                config, params = weights.load_converted(os.path.join(base_dir if from_base else src, name))
                if base_dir is not None and name == "unet":
                    _, base_params = weights.load_converted(os.path.join(base_dir, "unet"))
                    params = home.merge_base_unet(params, base_params, what=f"base {base} vs {src}")
                write_component(os.path.join(staged, name), name, config, params)
                del params
            for extra in ("tokenizer", "scheduler"):
                origin = next((d for d in (base_dir, src) if d and os.path.isdir(os.path.join(d, extra))), None)
                if origin is not None:
                    shutil.copytree(os.path.join(origin, extra), os.path.join(staged, extra))
            _write_model_index(staged, src)
        with open(os.path.join(staged, EXPORT_MARKER), "w") as f:
            json.dump({"source": os.path.abspath(src), "base": base_dir, "components": names}, f, indent=2)
        if os.path.lexists(dst):  # swap: old folder aside, new one in, old one deleted
            aside = f"{staged}.old"
            os.rename(dst, aside)
            os.rename(staged, dst)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(staged, dst)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return names


def _write_model_index(staged: str, src: str) -> None:
    """diffusers `model_index.json` listing the exported parts (kept from the source if it had one)."""
    if os.path.isfile(os.path.join(src, "model_index.json")):
        shutil.copy2(os.path.join(src, "model_index.json"), os.path.join(staged, "model_index.json"))
        return
    index: dict[str, Any] = {"_class_name": "StableDiffusionPipeline", "requires_safety_checker": False,
                             "safety_checker": [None, None], "feature_extractor": [None, None]}
    for name in os.listdir(staged):
        if name in _LIBRARIES:
            index[name] = list(_LIBRARIES[name])
    scheduler = os.path.join(staged, "scheduler", "scheduler_config.json")
    if os.path.isfile(scheduler):
        with open(scheduler) as f:
            index["scheduler"] = ["diffusers", json.load(f).get("_class_name", "DDIMScheduler")]
    with open(os.path.join(staged, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
