"""Component registry: a diffusers/transformers `config.json` -> our Flax module.

Mirrors how diffusers picks a class from `_class_name` (and transformers from `architectures` /
`model_type`). Each model module offers `from_config(config) -> nn.Module`, and its modules offer
`init_inputs(batch=1) -> dict` of kwargs for `module.init`, so one code path builds, shapes and
loads every component. Model modules are imported lazily, on first use.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax

from pasd_jax.assembly import weights
from pasd_jax.models.configs import FAMILY_KEY  # noqa: F401 - the key converted UNet configs carry

COMPONENTS = ("unet", "vae", "text_encoder", "controlnet")

# diffusers `_class_name` -> component name.
_DIFFUSERS_CLASSES = {
    "UNet2DConditionModel": "unet",
    "AutoencoderKL": "vae",
    "ControlNetModel": "controlnet",
}
_TRANSFORMERS_ARCHITECTURES = {"CLIPTextModel": "text_encoder"}
_TRANSFORMERS_MODEL_TYPES = {"clip_text_model": "text_encoder"}

_MODULES = {
    "unet": "pasd_jax.models.unet",
    "vae": "pasd_jax.models.vae",
    "text_encoder": "pasd_jax.models.clip_text",
    "controlnet": "pasd_jax.models.controlnet",
}



def detect_component(config: Mapping[str, Any]) -> str:
    """"unet", "vae", "text_encoder" or "controlnet" for a component config dict.

    Raises:
      ValueError naming the `_class_name` / `architectures` found when none is supported.
    """
    meta = config.get("_pasd_jax")
    if isinstance(meta, Mapping) and meta.get("component") in COMPONENTS:
        return meta["component"]
    class_name = config.get("_class_name")
    if class_name is not None:
        if class_name in _DIFFUSERS_CLASSES:
            return _DIFFUSERS_CLASSES[class_name]
        raise ValueError(f"unsupported diffusers component _class_name={class_name!r}; "
                         f"supported: {', '.join(_DIFFUSERS_CLASSES)}")
    architectures = config.get("architectures") or []
    for arch in architectures:
        if arch in _TRANSFORMERS_ARCHITECTURES:
            return _TRANSFORMERS_ARCHITECTURES[arch]
    model_type = config.get("model_type")
    if model_type in _TRANSFORMERS_MODEL_TYPES:
        return _TRANSFORMERS_MODEL_TYPES[model_type]
    if architectures or model_type:
        raise ValueError(f"unsupported transformers model (architectures={architectures!r}, "
                         f"model_type={model_type!r}); supported: CLIPTextModel")
    raise ValueError("config has neither a diffusers `_class_name` nor transformers `architectures`/"
                     "`model_type`; cannot tell which model it describes")


def detect_unet_family(state_dict_keys: Iterable[str]) -> str:
    """UNet code family from checkpoint keys (the config alone cannot tell):
    PACA `pixel_attentions` -> "pasd"; `attn2_plus`/`proj_in_plus` -> "pasd_light"; else "stock"."""
    keys = list(state_dict_keys)
    if any(".pixel_attentions." in k or k.startswith("pixel_attentions.") for k in keys):
        return "pasd"
    if any("attn2_plus" in k or "proj_in_plus" in k for k in keys):
        return "pasd_light"
    return "stock"


def model_module(component: str):
    """The `pasd_jax.models` module implementing `component` (imported on first use)."""
    if component not in _MODULES:
        raise ValueError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
    return importlib.import_module(_MODULES[component])


def build_module(config: Mapping[str, Any], **overrides: Any):
    """Flax module for a component config (a UNet config may carry `_pasd_family`).

    `overrides` go to the model's `from_config` (e.g. `dtype=jnp.bfloat16`).
    """
    return model_module(detect_component(config)).from_config(config, **overrides)


def abstract_params(module) -> dict:
    """The module's parameter tree as `jax.ShapeDtypeStruct` leaves, without allocating weights."""
    return jax.eval_shape(lambda: module.init(jax.random.key(0), **module.init_inputs()))["params"]


def prepare_state_dict(component: str, state_dict: Mapping[str, Any]) -> dict:
    """Per-component key pre-pass before the mechanical mapping (STYLE §2.4 step 4):
    legacy VAE attention names -> current diffusers names; CLIP keys get their `text_model.`
    prefix back where a transformers >= 5 live `state_dict()` dropped it."""
    if component == "vae":
        return model_module("vae").rename_legacy_vae_keys(state_dict)
    if component == "text_encoder":
        return model_module("text_encoder").with_text_model_prefix(state_dict)
    return dict(state_dict)


def load_model(src: str | os.PathLike, **overrides: Any) -> tuple[Any, dict]:
    """A converted folder (see `pasd_jax.assembly.weights`) -> (Flax module, params).

    Params are numpy arrays, checked against the module's parameter shapes.
    """
    config, params = weights.load_converted(src)
    module = build_module(config, **overrides)
    expected = jax.tree_util.tree_map(lambda s: tuple(s.shape), abstract_params(module))
    got = jax.tree_util.tree_map(lambda a: tuple(a.shape), params)
    if expected != got:
        raise ValueError(f"{os.fspath(src)}: stored parameters do not match the model built from its "
                         f"config.json (was the folder edited, or written by another version?)")
    return module, params
