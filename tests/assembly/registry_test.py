"""pasd_jax.assembly.registry: config -> component, UNet family from keys, module building."""

import jax
import pytest

from pasd_jax.assembly import registry

TINY_CLIP = dict(architectures=["CLIPTextModel"], model_type="clip_text_model", vocab_size=100, hidden_size=32,
                 intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16)


@pytest.mark.parametrize("config, component", [
    ({"_class_name": "UNet2DConditionModel"}, "unet"),
    ({"_class_name": "AutoencoderKL"}, "vae"),
    ({"_class_name": "ControlNetModel"}, "controlnet"),
    ({"architectures": ["CLIPTextModel"]}, "text_encoder"),
    ({"model_type": "clip_text_model"}, "text_encoder"),
    ({"_class_name": "Whatever", "_pasd_jax": {"component": "vae"}}, "vae"),
])
def test_detect_component(config, component):
    assert registry.detect_component(config) == component


def test_unsupported_components_are_named():
    with pytest.raises(ValueError, match="_class_name='UNet2DModel'"):
        registry.detect_component({"_class_name": "UNet2DModel"})
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
        registry.detect_component({"architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model_x"})
    with pytest.raises(ValueError, match="neither"):
        registry.detect_component({})


def test_detect_unet_family():
    assert registry.detect_unet_family(["up_blocks.1.pixel_attentions.0.proj_in.weight"]) == "pasd"
    assert registry.detect_unet_family(["down_blocks.0.attentions.0.transformer_blocks.0.attn2_plus.to_q.weight"]) \
        == "pasd_light"
    assert registry.detect_unet_family(["mid_block.attentions.0.proj_in_plus.weight"]) == "pasd_light"
    assert registry.detect_unet_family(["conv_in.weight", "mid_block.attentions.0.proj_in.weight"]) == "stock"


def test_build_module_and_abstract_params():
    module = registry.build_module(TINY_CLIP)
    params = registry.abstract_params(module)
    leaf = params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.shape == (100, 32)
