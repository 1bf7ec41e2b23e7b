"""Stable Diffusion 1.5 component configs (the values of the public `config.json` files), as dicts.

For building SD1.5-size models without any files at hand: benchmarks, shape checks, and training
from scratch in tests of the full-size graph. Weights never come from here (use `python -m convert`).
The PASD ControlNet config is `ControlNetModel.from_unet` of the UNet (PASD_REFERENCE §6).
"""

from __future__ import annotations

from pasd_jax.models import registry
from pasd_jax.models.controlnet import controlnet_config_from_unet

UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": 0.18215,
}

TEXT_ENCODER = {  # openai/clip-vit-large-patch14 text tower
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "bos_token_id": 0, "eos_token_id": 2,
    "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
    "vocab_size": 49408,
}

SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False,
    "prediction_type": "epsilon", "timestep_spacing": "leading",
}


def configs(family: str = "pasd", use_rrdb: bool = False) -> dict[str, dict]:
    """{"unet", "controlnet", "vae", "text_encoder"} -> SD1.5-size config dicts for a PASD family."""
    unet = dict(UNET, **{registry.FAMILY_KEY: family})
    return {"unet": unet, "controlnet": controlnet_config_from_unet(unet, use_rrdb=use_rrdb),
            "vae": dict(VAE), "text_encoder": dict(TEXT_ENCODER)}
