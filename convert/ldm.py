"""Original LDM single-file layout (A1111 / civitai checkpoints) <-> diffusers component names.

A single-file SD checkpoint keeps the CompVis/Stability module names of the original training
code: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE), `cond_stage_model.transformer.*`
(SD1 CLIP, transformers names) or `cond_stage_model.model.*` (SD2 OpenCLIP). The same facts
diffusers' `single_file_utils.convert_ldm_*_checkpoint` encode, written here as *prefix tables*
generated from the component config:

    ldm module prefix -> diffusers module prefix     e.g. input_blocks.1.0.in_layers.2 -> down_blocks.0.resnets.0.conv1

A key maps through its longest matching prefix; the rest of the key is unchanged (transformer
blocks have the same names in both layouts). Inverting a table gives the LDM name of a diffusers
key (used for LDM-named LoRAs and by tests that write LDM files). Model-type detection and the
config inference for files that carry no config.json live here too; torch is never imported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Callable

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."

# Keys present in real files that no diffusers component uses.
DROPPED = re.compile(r"^(model_ema\.|cond_stage_model\.model\.(text_projection|logit_scale)$|"
                     r"alphas_cumprod|alphas_cumprod_prev|betas|log_one_minus_alphas_cumprod|posterior_|"
                     r"sqrt_|model_ema$|lvlb_weights|logvar|v_pred$|ztsnr$|"
                     r"cond_stage_model\.transformer\.(text_model\.)?embeddings\.position_ids$)")


class UnsupportedCheckpointError(ValueError):
    """A single file holds a model type this converter does not support (SDXL, inpainting, ...)."""


# ---- model-type detection ------------------------------------------------------------------
def _shape(state: Mapping[str, Any], key: str) -> tuple[int, ...]:
    return tuple(int(d) for d in state[key].shape)


def detect_model_type(state: Mapping[str, Any]) -> str:
    """"sd1" or "sd2" for an SD1.x/SD2.x text-to-image single file, as the ecosystem tells them apart.

    SD2 is recognised by its 1024-wide cross-attention context (OpenCLIP-H), SD1 by 768. Anything
    else raises `UnsupportedCheckpointError` naming what was found.
    """
    keys = set(state)
    conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
    from convert import stablesr_layout  # StableSR files share the LDM prefixes; tell them apart first

    if stablesr_layout.describe(keys):
        raise UnsupportedCheckpointError(f"found {stablesr_layout.found_what(keys)}; convert StableSR models with "
                                         f"`python -m convert stablesr SR_CKPT CFW_CKPT DST`")
    if any(k.startswith("conditioner.embedders.") for k in keys):
        kind = "an SDXL refiner" if not any(k.startswith("conditioner.embedders.1.") for k in keys) else "SDXL"
        raise UnsupportedCheckpointError(f"found {kind} checkpoint (conditioner.embedders.* keys); "
                                         f"PASD builds on SD1.x/SD2.x")
    if any(k.startswith("control_model.") for k in keys):
        raise UnsupportedCheckpointError("found a ControlNet checkpoint (control_model.*), not an SD base model")
    if any("joint_blocks." in k or "double_blocks." in k for k in keys):
        raise UnsupportedCheckpointError("found an SD3/Flux-style transformer checkpoint (joint/double blocks); "
                                         "PASD builds on SD1.x/SD2.x UNets")
    if conv_in not in keys:
        lora = [k for k in keys if "lora" in k.lower()]
        if lora and len(lora) * 2 >= len(keys):
            raise UnsupportedCheckpointError("this file is a LoRA, not a full checkpoint; merge it into a base "
                                             "with --lora FILE[:MULT]")
        if any(k.startswith(("down_blocks.", "unet.down_blocks.", "encoder.down_blocks.")) for k in keys):
            raise UnsupportedCheckpointError("this file holds diffusers-named weights (down_blocks.*), not the "
                                             "LDM single-file layout; convert its diffusers folder instead")
        sample = ", ".join(sorted(keys)[:3]) or "no tensors"
        raise UnsupportedCheckpointError(f"unknown checkpoint layout: no {conv_in} (first keys: {sample}); "
                                         f"expected an SD1.x/SD2.x single file (model.diffusion_model.*, "
                                         f"first_stage_model.*, cond_stage_model.*)")
    in_channels = _shape(state, conv_in)[1]
    if in_channels != 4:
        kind = {9: "an inpainting", 8: "an instruct-pix2pix", 5: "a depth-to-image", 7: "an x4 upscaler"}.get(
            in_channels, f"a {in_channels}-channel")
        raise UnsupportedCheckpointError(f"found {kind} UNet ({in_channels} input channels in {conv_in}); "
                                         f"only text-to-image SD1.x/SD2.x (4 channels) is supported")
    if any(k.startswith(UNET_PREFIX + "label_emb.") for k in keys):
        raise UnsupportedCheckpointError("found a class-conditioned UNet (model.diffusion_model.label_emb: SD unCLIP "
                                         "or similar); only text-to-image SD1.x/SD2.x is supported")
    context = [_shape(state, k)[-1] for k in keys
               if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    if not context:
        raise UnsupportedCheckpointError("found a UNet without cross-attention (no attn2.to_k); not an SD model")
    width = context[0]
    if width == 768:
        return "sd1"
    if width == 1024:
        return "sd2"
    raise UnsupportedCheckpointError(f"found cross-attention context width {width}; SD1.x has 768, SD2.x 1024")


def detect_prediction_type(state: Mapping[str, Any], model_type: str, extras: Mapping[str, Any]) -> str | None:
    """"v_prediction" / "epsilon" from flags in the file, or None when the file does not say.

    A `v_pred` key (A1111/ComfyUI convention) means v-prediction. For SD2 without flags the
    ecosystem's rule applies: epsilon only for the 512-px base (global_step 875000), else v.
    """
    if "v_pred" in state:
        return "v_prediction"
    if model_type == "sd2" and "global_step" in extras:
        return "epsilon" if extras["global_step"] == 875000 else "v_prediction"
    return None


def split_ema(state: Mapping[str, Any], use_ema: bool) -> dict[str, str]:
    """{UNet LDM key: key to read}. With `use_ema` and EMA copies present, the UNet weights are
    read from `model_ema.<key without dots>` (the LDM trainer's flat EMA names)."""
    unet = [k for k in state if k.startswith(UNET_PREFIX)]
    if not use_ema:
        return {k: k for k in unet}
    ema = {k: EMA_PREFIX + k[len("model."):].replace(".", "") for k in unet}
    if not all(v in state for v in ema.values()):
        missing = [k for k, v in ema.items() if v not in state]
        raise ValueError(f"--extract-ema: the file has no EMA copy of {len(missing)} UNet weights "
                         f"(e.g. {missing[0]}); it is probably already pruned to EMA or non-EMA weights")
    return ema


def has_ema(state: Mapping[str, Any]) -> bool:
    """True when the file carries a separate EMA copy of the UNet (`model_ema.*`, > 100 keys)."""
    return sum(k.startswith(EMA_PREFIX) for k in state) > 100


# ---- prefix tables -------------------------------------------------------------------------
_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _layers(config: Mapping[str, Any]) -> int:
    layers = config.get("layers_per_block", 2)
    if not isinstance(layers, int):
        if len(set(layers)) != 1:
            raise UnsupportedCheckpointError(f"per-block layers_per_block {layers} has no LDM single-file layout")
        layers = layers[0]
    return int(layers)


def unet_table(config: Mapping[str, Any]) -> dict[str, str]:
    """LDM UNet module prefix (after `model.diffusion_model.`) -> diffusers UNet module prefix."""
    n, layers = len(config["block_out_channels"]), _layers(config)
    down, up = config["down_block_types"], config["up_block_types"]
    table = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}

    def resnet(ldm: str, diffusers: str) -> None:
        for a, b in _UNET_RESNET.items():
            table[f"{ldm}.{a}"] = f"{diffusers}.{b}"

    for b in range(n):
        for j in range(layers):
            i = 1 + b * (layers + 1) + j
            resnet(f"input_blocks.{i}.0", f"down_blocks.{b}.resnets.{j}")
            if down[b].startswith("CrossAttn"):
                table[f"input_blocks.{i}.1"] = f"down_blocks.{b}.attentions.{j}"
        if b < n - 1:
            table[f"input_blocks.{(b + 1) * (layers + 1)}.0.op"] = f"down_blocks.{b}.downsamplers.0.conv"
    resnet("middle_block.0", "mid_block.resnets.0")
    table["middle_block.1"] = "mid_block.attentions.0"
    resnet("middle_block.2", "mid_block.resnets.1")
    for b in range(n):
        cross = up[b].startswith("CrossAttn")
        for j in range(layers + 1):
            i = b * (layers + 1) + j
            resnet(f"output_blocks.{i}.0", f"up_blocks.{b}.resnets.{j}")
            if cross:
                table[f"output_blocks.{i}.1"] = f"up_blocks.{b}.attentions.{j}"
            if b < n - 1 and j == layers:
                table[f"output_blocks.{i}.{2 if cross else 1}.conv"] = f"up_blocks.{b}.upsamplers.0.conv"
    return table


def vae_table(config: Mapping[str, Any]) -> dict[str, str]:
    """LDM VAE module prefix (after `first_stage_model.`) -> diffusers AutoencoderKL module prefix."""
    n, layers = len(config["block_out_channels"]), _layers(config)
    table = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        table.update({f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_out": f"{part}.conv_out",
                      f"{part}.norm_out": f"{part}.conv_norm_out"})
        for i in (1, 2):
            table[f"{part}.mid.block_{i}"] = f"{part}.mid_block.resnets.{i - 1}"
            table[f"{part}.mid.block_{i}.nin_shortcut"] = f"{part}.mid_block.resnets.{i - 1}.conv_shortcut"
        for a, b in _VAE_ATTENTION.items():
            table[f"{part}.mid.attn_1.{a}"] = f"{part}.mid_block.attentions.0.{b}"
    for i in range(n):
        for j in range(layers):
            table[f"encoder.down.{i}.block.{j}"] = f"encoder.down_blocks.{i}.resnets.{j}"
            table[f"encoder.down.{i}.block.{j}.nin_shortcut"] = f"encoder.down_blocks.{i}.resnets.{j}.conv_shortcut"
        if i < n - 1:
            table[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        ldm = n - 1 - i  # the LDM decoder counts its levels from the bottom
        for j in range(layers + 1):
            table[f"decoder.up.{ldm}.block.{j}"] = f"decoder.up_blocks.{i}.resnets.{j}"
            table[f"decoder.up.{ldm}.block.{j}.nin_shortcut"] = f"decoder.up_blocks.{i}.resnets.{j}.conv_shortcut"
        if i < n - 1:
            table[f"decoder.up.{ldm}.upsample.conv"] = f"decoder.up_blocks.{i}.upsamplers.0.conv"
    return table


def open_clip_table(num_layers: int) -> dict[str, str]:
    """OpenCLIP text tower prefix (after `cond_stage_model.model.`) -> transformers CLIPTextModel
    prefix. SD2 uses the penultimate layer, so resblocks >= num_layers have no counterpart."""
    table = {"token_embedding": "text_model.embeddings.token_embedding",
             "positional_embedding": "text_model.embeddings.position_embedding.weight",
             "ln_final": "text_model.final_layer_norm"}
    for i in range(num_layers):
        src, dst = f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}"
        table.update({f"{src}.ln_1": f"{dst}.layer_norm1", f"{src}.ln_2": f"{dst}.layer_norm2",
                      f"{src}.attn.out_proj": f"{dst}.self_attn.out_proj", f"{src}.mlp.c_fc": f"{dst}.mlp.fc1",
                      f"{src}.mlp.c_proj": f"{dst}.mlp.fc2",
                      f"{src}.attn.in_proj_weight": f"{dst}.self_attn.in_proj.weight",
                      f"{src}.attn.in_proj_bias": f"{dst}.self_attn.in_proj.bias"})
    return table


def map_key(key: str, table: Mapping[str, str]) -> str | None:
    """`key` through the longest matching module prefix of `table`; None when none matches."""
    parts = key.split(".")
    for cut in range(len(parts), 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in table:
            return ".".join([table[prefix]] + parts[cut:])
    return None


def invert(table: Mapping[str, str]) -> dict[str, str]:
    """diffusers prefix -> LDM prefix."""
    return {v: k for k, v in table.items()}


# ---- per-component key plans ---------------------------------------------------------------
# A plan maps each diffusers key to (source key, transform); transforms reshape/split arrays.
Transform = Callable[[Any], Any] | None
Plan = dict[str, tuple[str, Transform]]


def _squeeze_1x1(array):
    """LDM VAE attention q/k/v/proj_out are 1×1 convs [C, C, 1, 1]; diffusers uses Linear [C, C]."""
    return array[:, :, 0, 0] if array.ndim == 4 else array


def _third(index: int) -> Callable[[Any], Any]:
    def take(array):
        n = array.shape[0] // 3
        return array[index * n:(index + 1) * n]
    return take


def plan_unet(keys: Mapping[str, str], config: Mapping[str, Any]) -> tuple[Plan, list[str]]:
    """{diffusers UNet key: (file key, None)} from `split_ema`'s {LDM key: file key}, plus the
    LDM keys that matched no table entry."""
    table, plan, unmatched = unet_table(config), {}, []
    for ldm_key, file_key in keys.items():
        new = map_key(ldm_key[len(UNET_PREFIX):], table)
        if new is None:
            unmatched.append(ldm_key)
        else:
            plan[new] = (file_key, None)
    return plan, unmatched


def plan_vae(keys: Iterable[str], config: Mapping[str, Any]) -> tuple[Plan, list[str]]:
    """{diffusers VAE key: (file key, 1×1 squeeze for attention weights)} and unmatched keys."""
    table, plan, unmatched = vae_table(config), {}, []
    for key in keys:
        new = map_key(key[len(VAE_PREFIX):], table)
        if new is None:
            unmatched.append(key)
            continue
        attention = ".attentions.0." in new and not new.split(".attentions.0.")[1].startswith("group_norm")
        plan[new] = (key, _squeeze_1x1 if attention and new.endswith(".weight") else None)
    return plan, unmatched


def plan_clip(keys: Iterable[str]) -> tuple[Plan, list[str]]:
    """SD1: `cond_stage_model.transformer.[text_model.]X` -> `text_model.X` (transformers names)."""
    plan = {}
    for key in keys:
        rest = key[len(CLIP_PREFIX):]
        plan[rest if rest.startswith("text_model.") else f"text_model.{rest}"] = (key, None)
    return plan, []


def plan_open_clip(keys: Iterable[str], num_layers: int) -> tuple[Plan, list[str]]:
    """SD2 OpenCLIP -> transformers CLIPTextModel; fused `in_proj` splits into q/k/v (in that order);
    resblocks past `num_layers` (SD2's unused last layer) are dropped."""
    table, plan, unmatched = open_clip_table(num_layers), {}, []
    for key in keys:
        rest = key[len(OPEN_CLIP_PREFIX):]
        block = re.match(r"transformer\.resblocks\.(\d+)\.", rest)
        if block and int(block.group(1)) >= num_layers:
            continue
        new = map_key(rest, table)
        if new is None:
            unmatched.append(key)
        elif ".self_attn.in_proj." in new:
            leaf = new.rsplit(".", 1)[1]
            for index, name in enumerate(("q_proj", "k_proj", "v_proj")):
                plan[new.replace("in_proj." + leaf, f"{name}.{leaf}")] = (key, _third(index))
        else:
            plan[new] = (key, None)
    return plan, unmatched


def component_keys(state: Mapping[str, Any]) -> dict[str, list[str]]:
    """Keys of a single file grouped by component ("unet", "vae", "text_encoder", "dropped",
    "other"); "other" keys belong to nothing we know and make the conversion fail."""
    groups: dict[str, list[str]] = {"unet": [], "vae": [], "text_encoder": [], "dropped": [], "other": []}
    for key in state:
        if key.startswith(UNET_PREFIX):
            groups["unet"].append(key)
        elif key.startswith(VAE_PREFIX):
            groups["vae"].append(key)
        elif DROPPED.match(key):
            groups["dropped"].append(key)
        elif key.startswith((CLIP_PREFIX, OPEN_CLIP_PREFIX)):
            groups["text_encoder"].append(key)
        else:
            groups["other"].append(key)
    return groups
