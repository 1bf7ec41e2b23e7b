"""CLIP text encoder: parity with transformers `CLIPTextModel`, config reading, full-size key structure."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.mapping import torch_to_flax
from pasd_jax.assembly.paths import flatten
from pasd_jax.models import clip_text
from tests.torch_oracle import max_diff, randomize_norms, state_dict_numpy

VOCAB, BOS, EOS = 1000, 998, 999
NEW_EOS = 3  # a non-legacy EOS id that is *not* the highest id, so argmax pooling would be wrong
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=BOS, pad_token_id=1)
# SD2.x text encoder (OpenCLIP-H as a transformers CLIPTextModel), 23 layers kept by diffusers.
SD2_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
                bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=512)


def _abstract_params(module):
    return jax.eval_shape(lambda: module.init(jax.random.key(0), **module.init_inputs()))["params"]


def _prompt_ids(rng: np.random.Generator, lengths, pad_ids, eos: int = EOS, total: int = 77) -> np.ndarray:
    """Rows: BOS, random tokens, EOS, then padding (EOS-style or 0-style), like the tokenizer."""
    rows = []
    for n, pad in zip(lengths, pad_ids):
        body = rng.integers(NEW_EOS + 1, BOS, size=n)
        rows.append(np.concatenate([[BOS], body, [eos], np.full(total - n - 2, eos if pad is None else pad)]))
    return np.stack(rows).astype(np.int32)


@pytest.mark.parametrize("eos_token_id", [2, NEW_EOS], ids=["legacy_eos", "eos"])
@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_matches_transformers(hidden_act, eos_token_id):
    """last_hidden_state, every hidden state, clip-skip embeddings and pooler_output vs torch."""
    torch = pytest.importorskip("torch")
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(**TINY, hidden_act=hidden_act, eos_token_id=eos_token_id)
    ref = CLIPTextModel(config).eval()
    randomize_norms(ref)
    ours = clip_text.from_config(config.to_dict())
    assert (ours.hidden_act, ours.eos_token_id, ours.num_hidden_layers) == (hidden_act, eos_token_id, 2)
    state = clip_text.with_text_model_prefix(state_dict_numpy(ref))
    params = torch_to_flax(state, _abstract_params(ours), what="CLIPTextModel")

    # Legacy (eos_token_id == 2): the EOS token is the highest id (49407 in SD), found by argmax.
    eos = EOS if eos_token_id == 2 else eos_token_id
    ids = _prompt_ids(np.random.default_rng(0), lengths=[5, 20, 75], pad_ids=[None, 0, None], eos=eos)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids).long(), output_hidden_states=True)
        want_skip1 = ref.final_layer_norm(want.hidden_states[-2]).numpy()
    got = jax.jit(lambda p, x: ours.apply({"params": p}, x))(params, ids)
    encode = jax.jit(lambda p, x, k: ours.apply({"params": p}, x, k, method="encode"), static_argnums=2)

    errors = {
        "last_hidden_state": max_diff(got.last_hidden_state, want.last_hidden_state.numpy()),
        "pooler_output": max_diff(got.pooler_output, want.pooler_output.numpy()),
        "encode(clip_skip=0)": max_diff(encode(params, ids, 0), want.last_hidden_state.numpy()),
        "encode(clip_skip=1)": max_diff(encode(params, ids, 1), want_skip1),
    }
    assert len(got.hidden_states) == len(want.hidden_states) == 3
    for i, (g, w) in enumerate(zip(got.hidden_states, want.hidden_states)):
        errors[f"hidden_states[{i}]"] = max_diff(g, w.numpy())
    print(f"{hidden_act}/eos={eos_token_id}: max |Δ| " + ", ".join(f"{k}={v:.2g}" for k, v in errors.items()))
    assert max(errors.values()) <= 1e-4, errors


def test_short_sequence_uses_leading_positions():
    """T < max_position_embeddings: positions 0..T-1, same as transformers."""
    torch = pytest.importorskip("torch")
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    ref = CLIPTextModel(CLIPTextConfig(**TINY, eos_token_id=EOS)).eval()
    ours = clip_text.from_config(ref.config.to_dict())
    params = torch_to_flax(clip_text.with_text_model_prefix(state_dict_numpy(ref)), _abstract_params(ours))
    ids = _prompt_ids(np.random.default_rng(1), lengths=[3, 8], pad_ids=[None, None], total=12)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids).long())
    got = jax.jit(lambda p, x: ours.apply({"params": p}, x))(params, ids)
    assert got.last_hidden_state.shape == (2, 12, 32)
    assert max_diff(got.last_hidden_state, want.last_hidden_state.numpy()) <= 1e-4
    assert max_diff(got.pooler_output, want.pooler_output.numpy()) <= 1e-4


def test_param_paths_follow_torch_names():
    module = clip_text.from_config(dict(TINY, hidden_act="quick_gelu"))
    paths = {"/".join(p) for p in flatten(_abstract_params(module))}
    assert "text_model/encoder/layers_1/self_attn/q_proj/kernel" in paths
    assert "text_model/encoder/layers_0/mlp/fc2/bias" in paths
    assert "text_model/embeddings/token_embedding/embedding" in paths
    assert "text_model/embeddings/position_embedding/embedding" in paths
    assert "text_model/final_layer_norm/scale" in paths
    assert not any(part.split("_")[0][:1].isupper() for p in paths for part in p.split("/")), paths


def test_from_config_rejects_unsupported_values():
    with pytest.raises(ValueError, match="hidden_act"):
        clip_text.from_config(dict(TINY, hidden_act="relu"))
    with pytest.raises(ValueError, match="num_attention_heads"):
        clip_text.from_config(dict(TINY, num_attention_heads=5))
    module = clip_text.from_config({"text_config": dict(TINY, hidden_act="gelu"), "unknown": 1},
                                   dtype=jnp.bfloat16)
    assert (module.hidden_act, module.vocab_size, module.dtype) == ("gelu", VOCAB, jnp.bfloat16)


def test_encode_rejects_bad_clip_skip():
    module = clip_text.from_config(TINY)
    abstract, ids = _abstract_params(module), module.init_inputs()["input_ids"]
    assert jax.eval_shape(lambda p: module.apply({"params": p}, ids, 2, method="encode"), abstract).shape == (1, 77, 32)
    with pytest.raises(ValueError, match="clip_skip"):
        jax.eval_shape(lambda p: module.apply({"params": p}, ids, 3, method="encode"), abstract)


def test_bf16_compute_keeps_float32_params():
    module = clip_text.from_config(TINY, dtype=jnp.bfloat16)
    variables = jax.jit(lambda: module.init(jax.random.key(0), **module.init_inputs(batch=2)))()
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    out = jax.jit(lambda v: module.apply(v, **module.init_inputs(batch=2)))(variables)
    assert out.last_hidden_state.dtype == jnp.bfloat16
    assert out.last_hidden_state.shape == (2, 77, 32)
    assert bool(jnp.all(jnp.isfinite(out.last_hidden_state.astype(jnp.float32))))


def _full_size_key_check(config_dict: dict) -> None:
    """Torch keys/shapes from a meta-device model convert 1:1 onto our abstract tree (no allocation)."""
    torch = pytest.importorskip("torch")
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        ref = CLIPTextModel(CLIPTextConfig.from_dict(config_dict))
    ours = clip_text.from_config(config_dict)
    zero = np.zeros((), np.float32)
    state = {k: np.broadcast_to(zero, tuple(v.shape)) for k, v in ref.state_dict().items()}
    state = clip_text.with_text_model_prefix(state)
    abstract = _abstract_params(ours)
    converted = torch_to_flax(state, abstract, what="CLIPTextModel (meta)")  # raises on any mismatch
    got = {p: v.shape for p, v in flatten(converted).items()}
    assert got == {p: v.shape for p, v in flatten(abstract).items()}
    assert len(got) == 2 + 16 * ours.num_hidden_layers + 2  # embeddings, layers, final LN


def test_sd15_text_encoder_keys_match_transformers(reference_dir):
    config = json.loads((reference_dir / "sd15" / "text_encoder" / "config.json").read_text())
    module = clip_text.from_config(config)
    assert (module.num_hidden_layers, module.hidden_size, module.hidden_act) == (12, 768, "quick_gelu")
    _full_size_key_check(config)


def test_sd2_text_encoder_keys_match_transformers():
    _full_size_key_check(SD2_TEXT)
