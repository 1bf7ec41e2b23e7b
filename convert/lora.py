"""Merge LoRA files into converted SD weights: `W += m · (alpha / rank) · up @ down`.

Accepted key styles (one file may mix them):

* kohya / A1111: `lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`, and
  `lora_te_<module>...` for the text encoder, where `<module>` is the diffusers/transformers module
  name with "." replaced by "_" (`down_blocks_0_attentions_0_proj_in`) or the original LDM name
  (`input_blocks_1_1_proj_in`). LoCon adds conv layers (`resnets_0_conv1`: 4-D down [r, in, kh, kw],
  up [out, r, 1, 1]).
* diffusers / PEFT: `<prefix>.<module>.lora_A.weight` / `.lora_B.weight` (`lora_A.default.weight`
  too) with prefix `unet.`, `text_encoder.`, `base_model.model.` or none; the older diffusers
  names `...attn1.processor.to_q_lora.down.weight` and `...to_q.lora.down.weight` as well.

Module names are matched exactly against the names of the model being merged into (computed
from its parameter tree, plus LDM aliases for the UNet), never by guessing. `alpha` defaults to
the rank (PEFT's `adapter_config.json` beside the file supplies `lora_alpha` when present). The
reference ignores alpha (PASD_REFERENCE §9.8); here it is applied, as every SD UI does.
LoHa/LoKr/DoRA/CP-decomposed LoCon are refused by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from convert import ldm, torch_io
from convert.mapping import torch_module_name
from pasd_jax.assembly import paths

_KOHYA = re.compile(r"^(lora_unet|lora_te\d?)_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT = re.compile(r"^(.+?)\.(lora_A|lora_B)(?:\.default)?\.weight$")
_PROCESSOR = re.compile(r"^(.+?)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_LORA_LAYER = re.compile(r"^(.+?)\.(?:lora|lora_linear_layer)\.(down|up)\.weight$")  # LoRACompatibleLinear
_PEFT_ALPHA = re.compile(r"^(.+?)\.alpha$")
_UNSUPPORTED = {r"\.hada_w": "LoHa", r"\.lokr_w": "LoKr", r"\.dora_scale$": "DoRA",
                r"\.lora_mid\.": "LoCon with CP decomposition (lora_mid)", r"\.diff(_b)?$": "full weight difference (.diff)"}
_COMPONENT_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "te.": "text_encoder"}


class LoraError(ValueError):
    """A LoRA file cannot be read, is of an unsupported kind, or does not fit the model."""


@dataclasses.dataclass
class LoraModule:
    """One LoRA pair: `delta = up @ down`, scaled by `alpha / rank`."""

    component: str | None  # "unet", "text_encoder", or None (unprefixed PEFT: either)
    name: str  # module name with "." (diffusers/PEFT) or "_" (kohya) separators
    down: np.ndarray | None = None  # [r, in] or [r, in, kh, kw]
    up: np.ndarray | None = None  # [out, r] or [out, r, 1, 1]
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclasses.dataclass
class LoraFile:
    """A parsed LoRA file and its multiplier (`--lora PATH:M`)."""

    path: str
    multiplier: float
    modules: dict[tuple[str | None, str], LoraModule]


def parse_lora_arg(text: str) -> tuple[str, float]:
    """"path/to.safetensors:0.7" -> (path, 0.7); no suffix -> multiplier 1.0."""
    path, sep, mult = text.rpartition(":")
    if sep and path:
        try:
            value = float(mult)
        except ValueError:
            return text, 1.0
        if not math.isfinite(value):
            raise ValueError(f"--lora {text}: the multiplier must be a finite number, got {mult!r}")
        return path, value
    return text, 1.0


def _peft_component(name: str) -> tuple[str | None, str]:
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    for prefix, component in _COMPONENT_PREFIXES.items():
        if name.startswith(prefix):
            return component, name[len(prefix):]
    return None, name


def _peft_alpha(path: str) -> float | None:
    config = os.path.join(os.path.dirname(path), "adapter_config.json")
    if not os.path.isfile(config):
        return None
    try:
        with open(config) as f:
            return float(json.load(f)["lora_alpha"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_lora(path: str | os.PathLike, multiplier: float = 1.0) -> LoraFile:
    """Parse a LoRA file (`.safetensors`, or a weights-only pickle) into `LoraModule`s.

    Raises LoraError for unsupported LoRA kinds, unknown keys and incomplete pairs.
    """
    path = os.fspath(path)
    state = torch_io.load_state_dict(path)
    if not state:
        raise LoraError(f"{path}: holds no tensors")
    for marker, kind in _UNSUPPORTED.items():
        if any(re.search(marker, k) for k in state):
            raise LoraError(f"{path}: {kind} weights are not supported (only LoRA/LoCon up/down pairs)")
    modules: dict[tuple[str | None, str], LoraModule] = {}
    unknown = []
    default_alpha = _peft_alpha(path)
    for key, value in state.items():
        if match := _KOHYA.match(key):
            prefix, name, part = match.groups()
            if prefix not in ("lora_unet", "lora_te", "lora_te1"):
                raise LoraError(f"{path}: {prefix}_* keys are for a second text encoder (SDXL); PASD uses SD1.x/SD2.x")
            component = "unet" if prefix == "lora_unet" else "text_encoder"
            part = {"lora_down.weight": "down", "lora_up.weight": "up"}.get(part, part)
        elif match := _PROCESSOR.match(key):
            base, proj, part = match.groups()
            component, base = _peft_component(base)
            name = f"{base}.{proj}.0" if proj == "to_out" else f"{base}.{proj}"
        elif match := _LORA_LAYER.match(key):
            component, name = _peft_component(match.group(1))
            part = match.group(2)
        elif match := _PEFT.match(key):
            component, name = _peft_component(match.group(1))
            part = "down" if match.group(2) == "lora_A" else "up"
        elif match := _PEFT_ALPHA.match(key):
            component, name = _peft_component(match.group(1))
            part = "alpha"
        else:
            unknown.append(key)
            continue
        module = modules.setdefault((component, name), LoraModule(component, name))
        if part == "alpha":
            module.alpha = float(np.asarray(value, np.float64).reshape(-1)[0])
        else:
            setattr(module, part, np.asarray(value, np.float32))
    if unknown:
        raise LoraError(f"{path}: {len(unknown)} keys are not LoRA weights: {', '.join(sorted(unknown)[:8])}"
                        f"{' ...' if len(unknown) > 8 else ''}")
    incomplete = [m.name for m in modules.values() if m.down is None or m.up is None]
    if incomplete:
        raise LoraError(f"{path}: {len(incomplete)} modules lack their down/up (lora_A/lora_B) half: "
                        f"{', '.join(sorted(incomplete)[:8])}")
    for module in modules.values():
        if module.alpha is None:
            module.alpha = default_alpha
        if module.up.shape[1] != module.rank:
            raise LoraError(f"{path}: {module.name}: up {module.up.shape} and down {module.down.shape} ranks differ")
    return LoraFile(path, float(multiplier), modules)


# ---- matching and merging ------------------------------------------------------------------
def module_index(params: Mapping, component: str, unet_config: Mapping[str, Any] | None = None) -> dict[str, tuple]:
    """{module name: Flax module path} for every module with a `kernel` in `params`, under its
    torch name with "." and with "_" separators; for the UNet also under its LDM name."""
    inverse = ldm.invert(ldm.unet_table(unet_config)) if component == "unet" and unet_config else None
    index: dict[str, tuple] = {}
    for path in paths.flatten(params):
        if path[-1] != "kernel":
            continue
        names = [torch_module_name(path[:-1])]
        if inverse is not None:
            alias = ldm.map_key(names[0], inverse)
            if alias is not None:
                names.append(alias)
        for name in names:
            index[name] = path[:-1]
            index[name.replace(".", "_")] = path[:-1]
    return index


def lora_delta(module: LoraModule, kernel_shape: tuple[int, ...]) -> np.ndarray:
    """`up @ down` in the Flax layout of the target kernel (Linear [in, out], Conv [kh, kw, in, out])."""
    out_features, rank = module.up.shape[0], module.rank
    delta = module.up.reshape(out_features, rank) @ module.down.reshape(rank, -1)  # [out, in·kh·kw]
    if delta.size != int(np.prod(kernel_shape)):
        raise LoraError(f"{module.name}: LoRA update {module.up.shape} @ {module.down.shape} does not fit the "
                        f"weight of shape {kernel_shape} (Flax layout)")
    if len(kernel_shape) == 4:
        kh, kw, cin, cout = kernel_shape
        return delta.reshape(cout, cin, kh, kw).transpose(2, 3, 1, 0)
    return delta.reshape(kernel_shape[1], kernel_shape[0]).T


class LoraSet:
    """Several LoRA files, each with its multiplier, merged component by component; remembers
    which modules found a target so that `unmatched()` can be checked once every component ran."""

    def __init__(self, files: Sequence[LoraFile]):
        self.files = list(files)
        self.used: set[tuple[int, tuple[str | None, str]]] = set()

    @classmethod
    def load(cls, specs: Iterable[tuple[str, float]]) -> "LoraSet":
        return cls([read_lora(path, mult) for path, mult in specs])

    def __bool__(self) -> bool:
        return bool(self.files)

    def merge(self, component: str, params: Mapping, unet_config: Mapping[str, Any] | None = None) -> dict:
        """Return `params` (nested Flax dict) with every matching LoRA module merged in float32."""
        index = module_index(params, component, unet_config)
        flat = paths.flatten(params)
        changed: dict[tuple, np.ndarray] = {}
        for i, lora in enumerate(self.files):
            for key, module in lora.modules.items():
                if module.component not in (None, component) or module.name not in index:
                    continue
                path = index[module.name] + ("kernel",)
                kernel = changed.get(path)
                if kernel is None:
                    kernel = np.array(flat[path], np.float32)
                alpha = module.alpha if module.alpha is not None else module.rank
                kernel += np.float32(lora.multiplier * alpha / module.rank) * lora_delta(module, kernel.shape)
                changed[path] = kernel
                self.used.add((i, key))
        if not changed:
            return params
        for path, kernel in changed.items():
            flat[path] = kernel.astype(np.asarray(flat[path]).dtype, copy=False)
        return paths.unflatten(flat)

    def unmatched(self) -> list[str]:
        """"file: module" for every LoRA module that matched nothing in any merged component."""
        return [f"{os.path.basename(lora.path)}: {module.name}" for i, lora in enumerate(self.files)
                for key, module in lora.modules.items() if (i, key) not in self.used]

    def describe(self) -> str:
        return ", ".join(f"{os.path.basename(f.path)} ×{f.multiplier:g} ({len(f.modules)} modules)" for f in self.files)


def fuse_lora_file(path: str | os.PathLike, unet_params: Mapping, text_params: Mapping,
                   unet_config: Mapping[str, Any] | None = None, multiplier: float = 1.0) -> tuple[dict, dict]:
    """Fuse one LoRA file into a PASD UNet's *stock* weights and the text encoder (sample.py --lcm-lora).

    PACA / `*_plus` leaves (`pasd_jax.assembly.home.is_pasd_only`) are never touched, whatever the
    file names; every LoRA module must find its layer. Returns (unet_params, text_params);
    raises LoraError naming the file and the problem.
    """
    from pasd_jax.assembly.home import is_pasd_only

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LoraError(f"{path}: no such LoRA file")
    loras = LoraSet.load([(path, multiplier)])
    flat = paths.flatten(unet_params)
    stock = paths.unflatten({k: v for k, v in flat.items() if not is_pasd_only(k)})
    merged = paths.flatten(loras.merge("unet", stock, unet_config))
    text_params = loras.merge("text_encoder", text_params)
    unmatched = loras.unmatched()
    if unmatched:
        raise LoraError(f"{path}: {len(unmatched)} LoRA modules match no layer of the UNet or text encoder (a LoRA "
                        f"for another SD version?): {', '.join(unmatched[:5])}")
    return paths.unflatten({k: merged.get(k, v) for k, v in flat.items()}), text_params
