"""StableSR assembly: the bundle of its four networks, and converted StableSR folders (read / write).

A converted StableSR folder (written by `python -m convert stablesr`, or by the smoke model):

    DST/pasd_jax.json                 {"model": "stablesr", "sampling": {...}, "components": {...}}
    DST/unet, struct_encoder, first_stage, cfw    config.json + flax_params.safetensors each
    DST/empty_context.safetensors     the cond stage's output for the empty prompt, (1, L, D)

`StableSRBundle` is what the StableSR sampler, CLI, training step and golden harness run: the SFT
UNet (`models.stablesr_unet`), the time-aware encoder (`models.stablesr_encoder`), the SR model's
encoder-only first stage and the CFW autoencoder (`models.cfw_vae`), their params, the sampling
settings of the SR config (schedule, latent `image_size`, scale factor) and the empty-prompt
context (the scripts only ever encode ''). Like `PASDBundle` it hashes by identity.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any, Optional

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from pasd_jax.assembly import registry, weights
from pasd_jax.diffusion.respaced_ddpm import RespacedSchedule
from pasd_jax.models import cfw_vae, stablesr_encoder, stablesr_unet

COMPONENTS = ("unet", "struct_encoder", "first_stage", "cfw")
CONTEXT_NAME = "empty_context.safetensors"
MODEL_KIND = "stablesr"


def build_module(component: str, config: Mapping[str, Any], **overrides):
    """Flax module of a StableSR component from its (converted) config."""
    config = {k: v for k, v in config.items() if k != weights.META_KEY}
    if component == "unet":
        return stablesr_unet.from_config(config, **overrides)
    if component == "struct_encoder":
        return stablesr_encoder.from_config(config, **overrides)
    if component in ("first_stage", "cfw"):
        return cfw_vae.from_config(config, cfw=component == "cfw", **overrides)
    raise ValueError(f"unknown StableSR component {component!r}; expected one of {COMPONENTS}")


def abstract_params(module) -> dict:
    return registry.abstract_params(module)


@dataclasses.dataclass(eq=False)
class StableSRBundle:
    """Modules + params of a StableSR model (module docstring)."""

    unet: Any
    struct_encoder: Any
    first_stage: Any
    cfw: Any
    params: dict            # component name -> params
    sampling: dict          # linear_start, linear_end, timesteps, image_size, scale_factor
    context: Optional[np.ndarray]  # (1, L, D) empty-prompt context
    smoke: bool = False     # the built-in smoke model (random weights)
    source: str = ""

    @property
    def scale_factor(self) -> float:
        return float(self.sampling.get("scale_factor", 0.18215))

    def schedule(self, steps: int) -> RespacedSchedule:
        s = self.sampling
        return RespacedSchedule.build(steps, linear_start=s.get("linear_start", 0.00085),
                                      linear_end=s.get("linear_end", 0.012), timesteps=s.get("timesteps", 1000))


def bundle_from(configs: Mapping[str, dict], params: Mapping[str, dict], sampling: Mapping[str, Any],
                context=None, **fields) -> StableSRBundle:
    modules = {name: build_module(name, configs[name]) for name in COMPONENTS}
    return StableSRBundle(**modules, params=jax.device_put(dict(params)), sampling=dict(sampling),
                          context=None if context is None else np.asarray(context, np.float32), **fields)


# ---- converted folders ---------------------------------------------------------------------
def read_manifest(folder: str | os.PathLike) -> dict | None:
    path = pathlib.Path(folder) / weights.MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_stablesr_folder(folder: str | os.PathLike) -> bool:
    """True for a converted StableSR folder (manifest `"model": "stablesr"`)."""
    manifest = read_manifest(folder)
    return bool(manifest) and manifest.get("model") == MODEL_KIND


def write_folder(dst: str | os.PathLike, configs: Mapping[str, dict], params: Mapping[str, dict], context, *,
                 sampling: Mapping[str, Any], overwrite: bool = False, extra: Mapping[str, Any] | None = None) -> None:
    """Write a converted StableSR folder atomically (nothing at `dst` unless all of it was written)."""
    with weights.staged_folder(dst, overwrite=overwrite) as staged:
        for name in COMPONENTS:
            weights.save_converted(os.path.join(staged, name), configs[name], params[name],
                                   component=f"stablesr_{name}")
        if context is not None:
            save_file({"context": np.ascontiguousarray(context, np.float32)}, os.path.join(staged, CONTEXT_NAME))
        manifest = {"model": MODEL_KIND, "format_version": weights.FORMAT_VERSION,
                    "components": {n: n for n in COMPONENTS}, "sampling": dict(sampling),
                    "context": CONTEXT_NAME if context is not None else None}
        weights.write_manifest(staged, {**manifest, **dict(extra or {})})


def load_stablesr(folder: str | os.PathLike, *, context: np.ndarray | None = None) -> StableSRBundle:
    """The bundle of a converted StableSR folder. The empty-prompt context comes from the folder
    unless given; a folder converted without the text tower needs `context`."""
    folder = pathlib.Path(folder)
    manifest = read_manifest(folder)
    if not manifest or manifest.get("model") != MODEL_KIND:
        raise ValueError(f"{folder} is not a converted StableSR folder (no {weights.MANIFEST_NAME} with "
                         f'"model": "stablesr"; convert with `python -m convert stablesr SR_CKPT CFW_CKPT DST`)')
    configs, params = {}, {}
    for name in COMPONENTS:
        configs[name], params[name] = weights.load_converted(folder / manifest["components"].get(name, name))
    if context is None:
        if not manifest.get("context"):
            raise ValueError(f"{folder} has no empty-prompt context (its SR checkpoint had no cond_stage_model.* "
                             f"text tower); reconvert from the full StableSR checkpoint")
        context = load_file(str(folder / manifest["context"]))["context"]
    return bundle_from(configs, params, manifest["sampling"], context, smoke=bool(manifest.get("smoke_model")),
                       source=str(folder))
