"""StableSR checkpoint layouts -> our parameter names: detection, configs, key plans (no torch).

Two files make a StableSR model (STABLESR_REFERENCE §7):

* the SR checkpoint (`stablesr_000117.ckpt["state_dict"]`, LDM names): `model.diffusion_model.*`
  (SFT UNet), `structcond_stage_model.*` (time-aware encoder), `first_stage_model.*` (SD VAE),
  `cond_stage_model.model.*` (OpenCLIP text tower, optional here) and 12 schedule buffers;
* the CFW autoencoder (`vqgan_cfw_00011.ckpt`): `encoder.*`, `decoder.*` (with
  `decoder.fusion_layer_*`), `quant_conv.*`, `post_quant_conv.*`, plus training-only `loss.*`.

Each key either maps to one of our components, or is dropped *by name* (`DROPPED_SR`,
`DROPPED_CFW`, with the reason), or is reported as unexpected; the strict mapping then reports
missing and mis-shaped parameters (`convert.mapping.torch_to_flax`). The UNet and VAE names go
through the SD single-file prefix tables of `convert.ldm` (plus `spade` carried along); the
encoder's ResBlock / Downsample / time-embedding names are renamed onto our blocks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from convert import ldm
from pasd_jax.models import cfw_vae, stablesr_encoder, stablesr_unet

ENCODER_PREFIX = "structcond_stage_model."

# Keys of a StableSR SR checkpoint no inference path reads, with the reason (reported, not silent).
DROPPED_SR = {
    "schedule buffers (the scripts re-register the schedule)": re.compile(
        r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
        r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|"
        r"posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|"
        r"lvlb_weights|logvar)$"),
    "first-stage decoder (no script decodes with it; the CFW decoder is used)": re.compile(
        r"^first_stage_model\.(decoder\.|post_quant_conv\.)"),
    "EMA copies (use_ema is False in the release)": re.compile(r"^model_ema\."),
    "OpenCLIP parts outside the text tower": re.compile(
        r"^cond_stage_model\.model\.(text_projection|logit_scale|visual\.)"),
}
DROPPED_CFW = {"training-only loss modules (LPIPS, discriminator)": re.compile(r"^loss\.")}

# LDM ResBlock / time-embedding / Downsample names -> our block names (time-aware encoder).
_ENCODER_RENAMES = [(re.compile(r"(^|\.)" + re.escape(a) + r"\."), r"\1" + b + ".") for a, b in (
    ("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"),
    ("op", "conv"), ("time_embed.0", "time_embed.linear_1"), ("time_embed.2", "time_embed.linear_2"))]


class StableSRLayoutError(ValueError):
    """A file is not the StableSR file expected (message: what was found instead)."""


def describe(keys: Iterable[str]) -> str | None:
    """"stablesr" (SR checkpoint), "stablesr_cfw" (CFW autoencoder) or None (not StableSR)."""
    keys = list(keys)
    if any(k.startswith(ENCODER_PREFIX) for k in keys) or any(
            k.startswith(ldm.UNET_PREFIX) and ".spade." in k for k in keys):
        return "stablesr"
    if any(k.startswith("decoder.fusion_layer_") for k in keys):
        return "stablesr_cfw"
    return None


def found_what(keys: Iterable[str]) -> str:
    """Human description of a file's layout, for refusal messages."""
    keys = list(keys)
    kind = describe(keys)
    if kind == "stablesr":
        return "a StableSR SR checkpoint (model.diffusion_model.* with spade, structcond_stage_model.*)"
    if kind == "stablesr_cfw":
        return "a StableSR CFW autoencoder (decoder.fusion_layer_*)"
    if any(k.startswith(ldm.UNET_PREFIX) for k in keys):
        return "an SD single-file checkpoint without StableSR parts (no structcond_stage_model.*, no spade)"
    if any(k.startswith(("down_blocks.", "controlnet_", "conv_in.")) for k in keys):
        return "diffusers-named weights (an SD/PASD component, not StableSR)"
    if any(k.startswith(("encoder.", "decoder.")) for k in keys):
        return "a plain autoencoder without CFW fusion layers"
    return f"an unknown layout (first keys: {', '.join(sorted(keys)[:3]) or 'no tensors'})"


def require(keys: Iterable[str], expected: str, path: str) -> None:
    """Raise `StableSRLayoutError` (one line) unless the file's layout is `expected`."""
    keys = list(keys)
    if describe(keys) != expected:
        want = {"stablesr": "the StableSR SR checkpoint (e.g. stablesr_000117.ckpt)",
                "stablesr_cfw": "the StableSR CFW autoencoder (e.g. vqgan_cfw_00011.ckpt)"}[expected]
        raise StableSRLayoutError(f"{path}: found {found_what(keys)}; expected {want}")


# ---- configs -------------------------------------------------------------------------------
#: `configs/stableSRNew/v2-finetune_text_T_512.yaml` and `autoencoder_kl_64x64x4_resi.yaml`
#: (the released models), used when no yaml is given.
RELEASED_SR = {
    "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "image_size": 512, "scale_factor": 0.18215,
    "parameterization": "eps",
    "unet_config": {"in_channels": 4, "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1],
                    "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_head_channels": 64,
                    "use_spatial_transformer": True, "use_linear_in_transformer": True, "transformer_depth": 1,
                    "context_dim": 1024, "legacy": False, "semb_channels": 256},
    "first_stage_config": {"embed_dim": 4, "ddconfig": {"double_z": True, "z_channels": 4, "in_channels": 3,
                                                        "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4],
                                                        "num_res_blocks": 2, "attn_resolutions": []}},
    "structcond_stage_config": {"in_channels": 4, "model_channels": 256, "out_channels": 256, "num_res_blocks": 2,
                                "attention_resolutions": [4, 2, 1], "channel_mult": [1, 1, 2, 2], "num_heads": 4,
                                "num_head_channels": -1},
}
RELEASED_CFW = {"embed_dim": 4, "ddconfig": dict(RELEASED_SR["first_stage_config"]["ddconfig"])}


def _params(node: Mapping[str, Any] | None) -> dict:
    """`{target, params}` yaml node -> its params (a bare params dict passes through)."""
    node = dict(node or {})
    return dict(node.get("params", node)) if "target" in node or "params" in node else node


def sr_configs(yaml_model: Mapping[str, Any] | None) -> dict:
    """Our configs from the `model` node of a StableSR yaml (None: the released model).

    Returns {"unet", "struct_encoder", "first_stage": component configs, "sampling": schedule and
    sizes}. Raises `UnsupportedConfigError` for options we do not implement (v-prediction included).
    """
    p = RELEASED_SR if yaml_model is None else _params(yaml_model)
    target = (yaml_model or {}).get("target", "ldm.models.diffusion.ddpm.LatentDiffusionSRTextWT")
    if not str(target).endswith("LatentDiffusionSRTextWT"):
        raise StableSRLayoutError(f"model.target is {target}, expected ...LatentDiffusionSRTextWT")
    param = p.get("parameterization", "eps")
    if param != "eps":
        raise StableSRLayoutError(f"parameterization {param!r} (e.g. the 768v model) is not supported; only eps")
    first = _params(p["first_stage_config"])
    return {
        "unet": stablesr_unet.config_from_ldm(_params(p["unet_config"])),
        "struct_encoder": stablesr_encoder.config_from_ldm(_params(p["structcond_stage_config"])),
        "first_stage": cfw_vae.config_from_ddconfig(first["ddconfig"], first["embed_dim"], cfw=False),
        "sampling": {"linear_start": float(p.get("linear_start", 0.00085)),
                     "linear_end": float(p.get("linear_end", 0.012)), "timesteps": int(p.get("timesteps", 1000)),
                     "image_size": int(p.get("image_size", 512)), "scale_factor": float(p.get("scale_factor", 0.18215))},
    }


def cfw_config(yaml_model: Mapping[str, Any] | None) -> dict:
    p = RELEASED_CFW if yaml_model is None else _params(yaml_model)
    return cfw_vae.config_from_ddconfig(p["ddconfig"], p["embed_dim"], cfw=True)


# ---- key plans -----------------------------------------------------------------------------
def _dropped_reason(key: str, dropped: Mapping[str, re.Pattern]) -> str | None:
    return next((why for why, pattern in dropped.items() if pattern.search(key)), None)


def _squeeze_conv1d(array):
    """ADM attention qkv / proj_out are Conv1d [O, I, 1]; ours are Dense (Linear layout [O, I])."""
    return array[:, :, 0] if array.ndim == 3 else array


def unet_table(config: Mapping[str, Any]) -> dict[str, str]:
    """`convert.ldm.unet_table` plus `<resblock>.spade -> <resnet>.spade` for every ResBlockDual."""
    table = ldm.unet_table(config)
    for src, dst in list(table.items()):
        if src.endswith(".in_layers.0"):
            table[src[:-len("in_layers.0")] + "spade"] = dst[:-len("norm1")] + "spade"
    return table


def encoder_key(key: str) -> str:
    """`structcond_stage_model.input_blocks.1.0.in_layers.0.weight` -> `input_blocks.1.0.norm1.weight`."""
    key = key[len(ENCODER_PREFIX):]
    for pattern, repl in _ENCODER_RENAMES:
        key = pattern.sub(repl, key)
    return key


def plan_sr(keys: Iterable[str], configs: Mapping[str, dict]):
    """SR checkpoint keys -> ({component: {our torch-style key: (file key, transform)}},
    {reason: [dropped keys]}, [unexpected keys], [text tower keys])."""
    table = unet_table(configs["unet"])
    plans: dict[str, dict] = {"unet": {}, "struct_encoder": {}, "first_stage": {}}
    dropped: dict[str, list] = {}
    unexpected, text, vae_keys = [], [], []
    for key in keys:
        why = _dropped_reason(key, DROPPED_SR)
        if why:
            dropped.setdefault(why, []).append(key)
        elif key.startswith(ldm.UNET_PREFIX):
            new = ldm.map_key(key[len(ldm.UNET_PREFIX):], table)
            if new is None:
                unexpected.append(key)
            else:
                plans["unet"][new] = (key, None)
        elif key.startswith(ENCODER_PREFIX):
            plans["struct_encoder"][encoder_key(key)] = (key, _squeeze_conv1d)
        elif key.startswith(ldm.VAE_PREFIX):
            vae_keys.append(key)
        elif key.startswith(ldm.OPEN_CLIP_PREFIX):
            text.append(key)
        else:
            unexpected.append(key)
    vae_config = dict(configs["first_stage"])
    plans["first_stage"], unmatched = ldm.plan_vae(vae_keys, vae_config)
    return plans, dropped, unexpected + unmatched, text


def plan_cfw(keys: Iterable[str], config: Mapping[str, Any]):
    """CFW keys -> ({our torch-style key: (file key, transform)}, {reason: [dropped]}, [unexpected])."""
    plan, dropped, vae_keys, unexpected = {}, {}, [], []
    for key in keys:
        why = _dropped_reason(key, DROPPED_CFW)
        if why:
            dropped.setdefault(why, []).append(key)
        elif key.startswith("decoder.fusion_layer_"):
            plan[key.replace(".encode_enc_1.conv_out.", ".encode_enc_1.conv_shortcut.")] = (key, None)
        else:
            vae_keys.append(key)
    vae_plan, unmatched = ldm.plan_vae([ldm.VAE_PREFIX + k for k in vae_keys], config)
    for new, (src, transform) in vae_plan.items():
        plan[new] = (src[len(ldm.VAE_PREFIX):], transform)
    return plan, dropped, unexpected + [k[len(ldm.VAE_PREFIX):] for k in unmatched]
