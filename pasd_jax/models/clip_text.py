"""CLIP text encoder in Flax linen, mirroring transformers `CLIPTextModel`.

SD1.x uses OpenAI clip-vit-large-patch14 (`hidden_act="quick_gelu"`), SD2.x OpenCLIP-H
(`hidden_act="gelu"`, 23 layers, width 1024). Attribute names equal the torch names of the
on-disk checkpoints, so `text_model.encoder.layers.3.self_attn.q_proj.weight` lands at
`text_model/encoder/layers_3/self_attn/q_proj/kernel` through `convert.mapping.torch_to_flax`.

transformers >= 5 drops the `text_model.` prefix from a *live* module's `state_dict()` (it is
re-added when saving); `with_text_model_prefix` restores it so both sources convert the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from pasd_jax.models.configs import check_supported, module_kwargs, one_of
from pasd_jax.nn.attention import layer_norm

_ACTIVATIONS = {
    # OpenAI CLIP's approximation, x·σ(1.702x) (transformers `QuickGELUActivation`).
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    # torch `nn.functional.gelu` default: exact erf form.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@flax.struct.dataclass
class CLIPTextOutput:
    """Mirrors transformers `BaseModelOutputWithPooling` with `output_hidden_states=True`.

    last_hidden_state: [B, T, D] after `final_layer_norm`.
    pooler_output: [B, D], the row of `last_hidden_state` at the EOS token.
    hidden_states: tuple of num_hidden_layers + 1 arrays [B, T, D]: the embeddings output, then
      each encoder layer's output (before the final LayerNorm).
    """

    last_hidden_state: jnp.ndarray
    pooler_output: jnp.ndarray
    hidden_states: tuple


class _TextFields(nn.Module):
    """Config fields shared by every module here (names = transformers `CLIPTextConfig` keys)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    eos_token_id: int = 2
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _config_fields(self) -> dict:
        """This module's config fields, to pass on to children."""
        return {name: getattr(self, name) for name in _FIELD_NAMES}


_FIELD_NAMES = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings", "layer_norm_eps", "hidden_act", "eos_token_id", "dtype", "param_dtype",
)


class CLIPTextEmbeddings(_TextFields):
    """Mirrors `CLIPTextEmbeddings`: token + learned absolute position embedding.

    input_ids [B, T] int (T ≤ max_position_embeddings) -> [B, T, D].
    """

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.token_embedding = nn.Embed(self.vocab_size, self.hidden_size, **kw)
        self.position_embedding = nn.Embed(self.max_position_embeddings, self.hidden_size, **kw)

    def __call__(self, input_ids: jnp.ndarray) -> jnp.ndarray:
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPAttention(_TextFields):
    """Mirrors `CLIPAttention` (q/k/v/out_proj, all with bias), causal. [B, T, D] -> [B, T, D]."""

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.q_proj = nn.Dense(self.hidden_size, **kw)
        self.k_proj = nn.Dense(self.hidden_size, **kw)
        self.v_proj = nn.Dense(self.hidden_size, **kw)
        self.out_proj = nn.Dense(self.hidden_size, **kw)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        b, t, d = x.shape
        heads = self.num_attention_heads
        head_dim = d // heads
        q, k, v = (proj(x).reshape(b, t, heads, head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
        # Layout [B, T, N, H]; jax computes the softmax in float32 whatever the input dtype.
        out = jax.nn.dot_product_attention(q, k, v, scale=head_dim ** -0.5, is_causal=True)
        return self.out_proj(out.reshape(b, t, d).astype(self.dtype))


class CLIPMLP(_TextFields):
    """Mirrors `CLIPMLP`: fc1 -> hidden_act -> fc2. [B, T, D] -> [B, T, D]."""

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.fc1 = nn.Dense(self.intermediate_size, **kw)
        self.fc2 = nn.Dense(self.hidden_size, **kw)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.fc2(_ACTIVATIONS[self.hidden_act](self.fc1(x)))


class CLIPEncoderLayer(_TextFields):
    """Mirrors `CLIPEncoderLayer`: pre-LN attention and MLP, each with a residual."""

    def setup(self):
        ln = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.layer_norm1 = layer_norm(self.layer_norm_eps, **ln)
        self.self_attn = CLIPAttention(**self._config_fields())
        self.layer_norm2 = layer_norm(self.layer_norm_eps, **ln)
        self.mlp = CLIPMLP(**self._config_fields())

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(_TextFields):
    """Mirrors `CLIPEncoder`; `layers` is a list, so Flax names its entries `layers_0`, `layers_1`, …"""

    def setup(self):
        self.layers = [CLIPEncoderLayer(**self._config_fields()) for _ in range(self.num_hidden_layers)]

    def __call__(self, x: jnp.ndarray, num_layers: Optional[int] = None) -> tuple:
        """[B, T, D] -> (input, output of layer 0, …) for the first `num_layers` layers (default all)."""
        states = [x]
        for layer in self.layers[: self.num_hidden_layers if num_layers is None else num_layers]:
            states.append(layer(states[-1]))
        return tuple(states)


class CLIPTextTransformer(_TextFields):
    """Mirrors transformers `CLIPTextTransformer` (the `text_model` of `CLIPTextModel`)."""

    def setup(self):
        self.embeddings = CLIPTextEmbeddings(**self._config_fields())
        self.encoder = CLIPEncoder(**self._config_fields())
        self.final_layer_norm = layer_norm(self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, input_ids: jnp.ndarray) -> CLIPTextOutput:
        hidden_states = self.encoder(self.embeddings(input_ids))
        last = self.final_layer_norm(hidden_states[-1])
        if self.eos_token_id == 2:
            # Legacy configs (SD1.x/2.x): transformers takes the highest id, which is the EOS token.
            eos_pos = jnp.argmax(input_ids, axis=-1)
        else:
            # First EOS (padding may repeat the EOS id).
            eos_pos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]
        return CLIPTextOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden_states)

    def encode(self, input_ids: jnp.ndarray, clip_skip: int = 0) -> jnp.ndarray:
        """See `CLIPTextModel.encode`; runs only the layers whose output is needed."""
        if not 0 <= clip_skip <= self.num_hidden_layers:
            raise ValueError(f"clip_skip={clip_skip} must be in [0, {self.num_hidden_layers}]")
        states = self.encoder(self.embeddings(input_ids), num_layers=self.num_hidden_layers - clip_skip)
        return self.final_layer_norm(states[-1])


class CLIPTextModel(_TextFields):
    """Mirrors transformers `CLIPTextModel`: `input_ids` [B, T] int32 -> `CLIPTextOutput`.

    Fields are the `CLIPTextConfig` keys used by the forward pass plus `dtype` (compute) and
    `param_dtype` (storage); LayerNorm statistics and the attention softmax stay float32.
    Build one from a transformers `config.json` with `from_config`.
    """

    def setup(self):
        self.text_model = CLIPTextTransformer(**self._config_fields())

    def __call__(self, input_ids: jnp.ndarray) -> CLIPTextOutput:
        return self.text_model(input_ids)

    def encode(self, input_ids: jnp.ndarray, clip_skip: int = 0) -> jnp.ndarray:
        """Prompt embeddings for the UNet's cross-attention, [B, T] -> [B, T, D].

        clip_skip=0 gives `last_hidden_state`; clip_skip=k ≥ 1 gives `hidden_states[-(k + 1)]`
        (the output k layers before the last) passed through `final_layer_norm`, as diffusers'
        `encode_prompt(clip_skip=k)` does. Call with `module.apply(vars, ids, k, method="encode")`.
        """
        return self.text_model.encode(input_ids, clip_skip)

    def init_inputs(self, batch: int = 1) -> dict:
        """kwargs for `module.init(rng, **inputs)`: zero `input_ids` [batch, max_position_embeddings]."""
        return {"input_ids": jnp.zeros((batch, self.max_position_embeddings), jnp.int32)}


def from_config(config: Mapping[str, Any], **overrides: Any) -> CLIPTextModel:
    """Build a `CLIPTextModel` from a transformers `config.json` dict.

    Accepts a `CLIPTextConfig` dict or a full `CLIPConfig` dict (its `text_config` is used).
    Unknown keys are ignored; `overrides` set fields directly (e.g. `dtype=jnp.bfloat16`).

    Raises:
      ValueError (`UnsupportedConfigError`) naming each key whose value this port does not support.
    """
    if "text_config" in config:
        config = config["text_config"]
    check_supported(
        config,
        {
            "hidden_act": one_of(*_ACTIVATIONS),
            "position_embedding_type": one_of("absolute"),
        },
        "CLIPTextModel",
    )
    kwargs = module_kwargs(CLIPTextModel, config, **overrides)
    hidden = kwargs.get("hidden_size", CLIPTextModel.hidden_size)
    heads = kwargs.get("num_attention_heads", CLIPTextModel.num_attention_heads)
    if hidden % heads:
        raise ValueError(f"CLIPTextModel: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    return CLIPTextModel(**kwargs)


def with_text_model_prefix(state_dict: Mapping[str, Any]) -> dict:
    """Prefix keys with `text_model.` where missing (live transformers >= 5 `state_dict()`).

    Checkpoint files (`text_encoder/model.safetensors`) already carry the prefix and pass unchanged.
    """
    return {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state_dict.items()}
