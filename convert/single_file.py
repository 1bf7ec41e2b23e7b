"""Single-file SD checkpoints (A1111 / civitai `.safetensors`, `.ckpt`, `.pt`) -> converted pipeline.

Mirrors what diffusers' `StableDiffusionPipeline.from_single_file` does, without torch and with the
tensors streamed: the file's keys are grouped by component (`convert.ldm`), each component's
config comes from a template pipeline folder (diffusers' `config=`) or is inferred from tensor
shapes, and its weights are read one tensor at a time as the strict mapping asks for them
(safetensors by offset, so only one component's converted weights are in memory at once), then
written tensor by tensor. The result has the layout `python -m convert` gives a diffusers
pipeline: unet/, vae/, text_encoder/ (+ tokenizer/, scheduler/, pasd_jax.json).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from convert import ldm, torch_io
from convert.core import NonFiniteWeightsWarning, abstract_params_for, format_count
from convert.mapping import ConversionError, torch_to_flax
from convert.safetensors_writer import save_converted_streaming
from pasd_jax.assembly import defaults, home, paths, registry, weights
from pasd_jax.diffusion import schedule

SINGLE_FILE_EXTENSIONS = (torch_io.SAFETENSORS_EXTENSION,) + torch_io.PICKLE_EXTENSIONS
# Prediction types an SD checkpoint file can have (the schedule also knows "sample").
PREDICTION_TYPES = tuple(p for p in schedule.PREDICTION_TYPES if p != "sample")

# ---- lazily read tensors -------------------------------------------------------------------
class LazyTensor:
    """A checkpoint tensor read only when numpy asks for it (`np.asarray`), then optionally
    transformed (1×1 squeeze, q/k/v split); `shape`/`dtype` describe the stored tensor."""

    def __init__(self, key: str, shape: tuple[int, ...], dtype: np.dtype, load: Callable[[], np.ndarray],
                 transform: Callable[[np.ndarray], np.ndarray] | None = None,
                 on_load: Callable[[str, np.ndarray], None] | None = None):
        self.key, self.shape, self.dtype = key, tuple(shape), np.dtype(dtype)
        self._load, self._transform, self._on_load = load, transform, on_load

    def with_transform(self, transform, on_load) -> "LazyTensor":
        return LazyTensor(self.key, self.shape, self.dtype, self._load, transform, on_load)

    def __array__(self, dtype=None, copy=None):
        array = self._load()
        if self._on_load is not None:
            self._on_load(self.key, array)
        if self._transform is not None:
            array = self._transform(array)
        return array if dtype is None else array.astype(dtype)


@dataclasses.dataclass
class CheckpointFile:
    """The tensors of a single file as `LazyTensor`s, plus top-level scalars (`global_step`)."""

    path: str
    tensors: dict[str, LazyTensor]
    extras: dict

    def dtypes(self) -> str:
        """"float16 (1130), float32 (2)": stored dtypes with counts, most common first."""
        counts: dict[str, int] = {}
        for tensor in self.tensors.values():
            counts[str(tensor.dtype)] = counts.get(str(tensor.dtype), 0) + 1
        return ", ".join(f"{k} ({v})" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def open_checkpoint(path: str | os.PathLike) -> CheckpointFile:
    """Index a single file without reading tensor data: safetensors by its header, `.ckpt` / `.pt` /
    `.pth` / `.bin` through the weights-only unpickler in lazy mode (nothing from the file runs)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder; single-file conversion expects a checkpoint file")
    if os.path.splitext(path)[1].lower() != torch_io.SAFETENSORS_EXTENSION:
        state, extras = torch_io.load_checkpoint(path, lazy=True)
        return CheckpointFile(path, {k: LazyTensor(k, v.shape, v.dtype, lambda v=v: np.asarray(v))
                                     for k, v in state.items()}, extras)
    torch_io.check_checkpoint_file(path)
    tensors = {}
    for name, (dtype, shape, offset) in torch_io.safetensors_index(path).items():
        count = int(np.prod(shape))

        def load(dtype=dtype, shape=shape, offset=offset, count=count):
            return np.fromfile(path, dtype=dtype, count=count, offset=offset).reshape(shape)

        tensors[name] = LazyTensor(name, shape, dtype, load)
    return CheckpointFile(path, tensors, {})


# ---- configs -------------------------------------------------------------------------------
def _count(keys, pattern: str) -> int:
    found = {m.group(1) for k in keys if (m := re.match(pattern, k))}
    return len(found)


def infer_unet_config(state: Mapping[str, Any], model_type: str, prediction_type: str) -> dict:
    """diffusers UNet config from LDM tensor shapes (SD1.x: 8 heads; SD2.x: 64-wide heads and
    linear projections, as the released SD2 configs say)."""
    p = ldm.UNET_PREFIX
    ops = sorted(int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(p)}input_blocks\.(\d+)\.0\.op\.weight$", k)))
    if not ops:
        raise ldm.UnsupportedCheckpointError("UNet has no downsamplers (input_blocks.N.0.op); not an SD UNet")
    layers, n = ops[0] - 1, len(ops) + 1
    first = [1 + b * (layers + 1) for b in range(n)]
    block_out = [int(state[f"{p}input_blocks.{i}.0.out_layers.3.weight"].shape[0]) for i in first]
    down = ["CrossAttnDownBlock2D" if f"{p}input_blocks.{i}.1.proj_in.weight" in state else "DownBlock2D" for i in first]
    up = ["CrossAttnUpBlock2D" if f"{p}output_blocks.{b * (layers + 1)}.1.proj_in.weight" in state else "UpBlock2D"
          for b in range(n)]
    proj_in = next(state[k] for k in state if k.startswith(p) and k.endswith(".proj_in.weight"))
    context = next(int(state[k].shape[-1]) for k in state if k.startswith(p) and k.endswith("attn2.to_k.weight"))
    sd2 = model_type == "sd2"
    return {
        "_class_name": "UNet2DConditionModel", registry.FAMILY_KEY: "stock",
        "sample_size": 96 if sd2 and prediction_type == "v_prediction" else 64,
        "in_channels": int(state[f"{p}input_blocks.0.0.weight"].shape[1]),
        "out_channels": int(state[f"{p}out.2.weight"].shape[0]),
        "down_block_types": down, "up_block_types": up, "block_out_channels": block_out,
        "layers_per_block": layers, "cross_attention_dim": context,
        "attention_head_dim": [max(c // 64, 1) for c in block_out] if sd2 else 8,
        "use_linear_projection": len(proj_in.shape) == 2, "upcast_attention": sd2 and prediction_type == "v_prediction",
        "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
        "downsample_padding": 1, "mid_block_scale_factor": 1, "center_input_sample": False,
    }


def infer_vae_config(state: Mapping[str, Any], sample_size: int) -> dict:
    """diffusers AutoencoderKL config from LDM `first_stage_model.*` shapes."""
    p = ldm.VAE_PREFIX
    n = _count(state, rf"{re.escape(p)}encoder\.down\.(\d+)\.block\.0\.conv1\.weight$")
    layers = _count(state, rf"{re.escape(p)}encoder\.down\.0\.block\.(\d+)\.conv1\.weight$")
    if n == 0:
        raise ldm.UnsupportedCheckpointError(f"no VAE in the file ({p}encoder.down.* missing)")
    return {
        "_class_name": "AutoencoderKL", "in_channels": int(state[f"{p}encoder.conv_in.weight"].shape[1]),
        "out_channels": int(state[f"{p}decoder.conv_out.weight"].shape[0]),
        "latent_channels": int(state[f"{p}post_quant_conv.weight"].shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [int(state[f"{p}encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(n)],
        "layers_per_block": layers, "norm_num_groups": 32, "act_fn": "silu", "sample_size": sample_size,
        "scaling_factor": 0.18215,
    }


def infer_text_config(state: Mapping[str, Any], model_type: str) -> dict:
    """transformers CLIPTextConfig from the text tower shapes: OpenAI CLIP-L (SD1, quick_gelu) or
    OpenCLIP-H without its last layer (SD2, gelu), 64-wide heads."""
    if model_type == "sd1":
        p = ldm.CLIP_PREFIX + ("text_model." if any(k.startswith(ldm.CLIP_PREFIX + "text_model.") for k in state) else "")
        vocab, hidden = state[f"{p}embeddings.token_embedding.weight"].shape
        positions = state[f"{p}embeddings.position_embedding.weight"].shape[0]
        layers = _count(state, rf"{re.escape(p)}encoder\.layers\.(\d+)\.mlp\.fc1\.weight$")
        intermediate = state[f"{p}encoder.layers.0.mlp.fc1.weight"].shape[0]
        act = "quick_gelu"
    else:
        p = ldm.OPEN_CLIP_PREFIX
        vocab, hidden = state[f"{p}token_embedding.weight"].shape
        positions = state[f"{p}positional_embedding"].shape[0]
        layers = _count(state, rf"{re.escape(p)}transformer\.resblocks\.(\d+)\.mlp\.c_fc\.weight$") - 1
        intermediate = state[f"{p}transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        act = "gelu"
    return {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": int(vocab),
        "hidden_size": int(hidden), "intermediate_size": int(intermediate), "num_hidden_layers": int(layers),
        "num_attention_heads": max(int(hidden) // 64, 1), "max_position_embeddings": int(positions),
        "layer_norm_eps": 1e-5, "hidden_act": act, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
        "projection_dim": 768 if model_type == "sd1" else 512,
    }


def template_config(template: str, component: str) -> dict | None:
    """`template/<component>/config.json` (diffusers or converted folder), without our metadata."""
    path = os.path.join(template, component, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        config = json.load(f)
    config.pop(weights.META_KEY, None)
    if component == "unet":
        config[registry.FAMILY_KEY] = "stock"  # a single file is a stock SD UNet even if the template is PASD
    return config


def template_scheduler(template: str | None) -> dict | None:
    if template is None:
        return None
    path = os.path.join(template, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def fallback_tokenizer(model_type: str) -> str | None:
    """tokenizer/ of a stored base of the same SD version (every SD1.x model shares one CLIP
    tokenizer, every SD2.x model another), or None."""
    for name in home.list_bases():
        folder = home.bases_dir() / name
        try:
            with open(folder / weights.MANIFEST_NAME) as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            continue
        if manifest.get("model_type") == model_type:
            return os.fspath(folder / "tokenizer")
    return None


# ---- conversion ----------------------------------------------------------------------------
NO_TOKENIZER = ("no tokenizer: a single file does not contain one; pass --template DIR (a diffusers SD "
                "pipeline folder) or first store a base of the same SD version that has one")

@dataclasses.dataclass
class SingleFileReport:
    """What `convert_single_file` found and wrote."""

    model_type: str
    prediction_type: str
    used_ema: bool
    dtypes: str
    num_params: dict[str, int]
    tokenizer: str | None
    seconds: float
    non_finite: list[str]

    def describe(self) -> str:
        parts = ", ".join(f"{k} {format_count(v)}" for k, v in self.num_params.items())
        return (f"{self.model_type.upper()} single file ({self.dtypes}; {'EMA' if self.used_ema else 'non-EMA'} "
                f"UNet weights; {self.prediction_type}): {parts}; {self.seconds:.1f} s")


def _component_plans(ckpt: CheckpointFile, model_type: str, configs: Mapping[str, dict], use_ema: bool):
    groups = ldm.component_keys(ckpt.tensors)
    if groups["other"]:
        other = sorted(groups["other"])
        raise ConversionError(f"{ckpt.path}: {len(other)} keys belong to no SD component: "
                              f"{', '.join(other[:10])}{' ...' if len(other) > 10 else ''}")
    for name, prefix in (("vae", ldm.VAE_PREFIX), ("text_encoder", "cond_stage_model.*")):
        if not groups[name]:
            raise ldm.UnsupportedCheckpointError(f"{ckpt.path}: the file holds no {name} ({prefix} keys); "
                                                 f"only complete SD checkpoints (UNet, VAE, text encoder) convert")
    unet_plan, unet_left = ldm.plan_unet(ldm.split_ema(ckpt.tensors, use_ema), configs["unet"])
    vae_plan, vae_left = ldm.plan_vae(groups["vae"], configs["vae"])
    if model_type == "sd1":
        text_plan, text_left = ldm.plan_clip(groups["text_encoder"])
    else:
        text_plan, text_left = ldm.plan_open_clip(groups["text_encoder"], configs["text_encoder"]["num_hidden_layers"])
    left = unet_left + vae_left + text_left
    if left:
        raise ConversionError(f"{ckpt.path}: {len(left)} keys match no module of the configured model "
                              f"(wrong --template?): {', '.join(sorted(left)[:10])}")
    return {"unet": unet_plan, "vae": vae_plan, "text_encoder": text_plan}


def convert_single_file(src: str | os.PathLike, out: str | os.PathLike, *, template: str | None = None,
                        prediction_type: str | None = None, extract_ema: bool = False,
                        edit_params: Callable[[str, dict, dict], dict] | None = None,
                        progress: Callable[[str, int], Any] | None = None,
                        require_tokenizer: bool = False) -> SingleFileReport:
    """Convert an SD1.x/SD2.x single file into the new folder `out` (not atomic: callers stage).

    Args:
      template: optional diffusers/converted SD pipeline folder: its component configs replace the
        inferred ones, its tokenizer/ and scheduler/ are used.
      prediction_type: "epsilon" / "v_prediction" override of the detected type.
      extract_ema: read the UNet from the file's EMA copy (`model_ema.*`).
      edit_params: `(component, params, config) -> params` hook run before saving (LoRA merges).
      progress: `(component, num_tensors)` -> object with `update()` and `close()` (a tqdm bar).
      require_tokenizer: fail before converting anything when no tokenizer can be found.

    Raises:
      ldm.UnsupportedCheckpointError, ConversionError, torch_io.CheckpointReadError, ValueError.
    """
    start = time.perf_counter()
    ckpt = open_checkpoint(src)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction type {prediction_type!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    model_type = ldm.detect_model_type(ckpt.tensors)
    scheduler = dict(template_scheduler(template) or defaults.SCHEDULER)
    detected = ldm.detect_prediction_type(ckpt.tensors, model_type, ckpt.extras)
    prediction = prediction_type or detected or scheduler.get("prediction_type") or "epsilon"
    scheduler["prediction_type"] = prediction
    if "ztsnr" in ckpt.tensors:
        scheduler["rescale_betas_zero_snr"] = True
    inferred = {"unet": lambda: infer_unet_config(ckpt.tensors, model_type, prediction),
                "vae": lambda: infer_vae_config(ckpt.tensors, 768 if prediction == "v_prediction" and model_type == "sd2" else 512),
                "text_encoder": lambda: infer_text_config(ckpt.tensors, model_type)}
    configs = {name: (template and template_config(template, name)) or make() for name, make in inferred.items()}
    use_ema = extract_ema and ldm.has_ema(ckpt.tensors)
    if extract_ema and not use_ema:
        raise ValueError(f"--extract-ema: {ckpt.path} has no separate EMA weights (model_ema.*)")
    plans = _component_plans(ckpt, model_type, configs, use_ema)
    tokenizer = os.path.join(template, "tokenizer") if template and os.path.isdir(os.path.join(template, "tokenizer")) \
        else fallback_tokenizer(model_type)
    if tokenizer is None and require_tokenizer:
        raise FileNotFoundError(NO_TOKENIZER)

    out = os.fspath(out)
    os.makedirs(out)
    non_finite: list[str] = []

    def check(key: str, array: np.ndarray) -> None:
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            non_finite.append(key)

    num_params = {}
    for name, plan in plans.items():
        abstract = abstract_params_for(configs[name])  # traced first: the bar then measures reading only
        bar = progress(name, len(plan)) if progress else None

        def on_load(key, array, bar=bar):
            check(key, array)
            if bar is not None:
                bar.update()

        lazy = {new: ckpt.tensors[key].with_transform(transform, on_load) for new, (key, transform) in plan.items()}
        state = registry.prepare_state_dict(name, lazy)
        params = torch_to_flax(state, abstract, what=f"{ckpt.path} ({name})")
        del lazy, state
        if bar is not None:
            bar.close()
        if edit_params is not None:
            params = edit_params(name, params, configs[name])
        save_converted_streaming(os.path.join(out, name), configs[name], params, component=name)
        num_params[name] = sum(int(np.size(v)) for v in paths.leaves(params))
        del params
    if non_finite:
        warnings.warn(f"{ckpt.path}: {len(non_finite)} tensors contain NaN or Inf: {', '.join(non_finite[:10])}"
                      f"{' ...' if len(non_finite) > 10 else ''}", NonFiniteWeightsWarning, stacklevel=2)

    if tokenizer is not None:
        shutil.copytree(tokenizer, os.path.join(out, "tokenizer"))
    os.makedirs(os.path.join(out, "scheduler"))
    with open(os.path.join(out, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler, f, indent=2, sort_keys=True)
        f.write("\n")
    manifest = {"format_version": weights.FORMAT_VERSION, "source": os.path.abspath(ckpt.path),
                "model_type": model_type, "prediction_type": prediction, "ema": use_ema,
                "components": {n: {"family": "stock" if n == "unet" else None, "num_params": c}
                               for n, c in num_params.items()},
                "copied": (["tokenizer"] if tokenizer else []), "tokenizer_from": tokenizer}
    with open(os.path.join(out, weights.MANIFEST_NAME), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    return SingleFileReport(model_type, prediction, use_ema, ckpt.dtypes(), num_params, tokenizer,
                            time.perf_counter() - start, non_finite)
