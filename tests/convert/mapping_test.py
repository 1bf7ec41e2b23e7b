"""convert.mapping: the mechanical torch -> Flax mapping (STYLE §2.4) on a small hand-made model.

The Flax twin uses torch's attribute names (`conv_in`, `layers.N`, `norm`, `embed`), so the
mapping needs no table; layouts are checked numerically against torch.nn.Conv2d / Linear.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.mapping import ConversionError, flax_to_torch, fold_key, torch_to_flax

torch = pytest.importorskip("torch")


class FlaxTwin(nn.Module):
    """conv_in (Conv2d 3->4, 3x3) -> mean over space -> layers (Linear 4->8->5) -> LayerNorm; plus an Embedding."""

    def setup(self):
        self.conv_in = nn.Conv(4, (3, 3), padding=1)
        self.layers = [nn.Dense(8), nn.Dense(5)]
        self.norm = nn.LayerNorm(epsilon=1e-5)
        self.embed = nn.Embed(10, 5)

    def __call__(self, x, ids):  # x: NHWC
        h = self.conv_in(x).mean(axis=(1, 2))
        for layer in self.layers:
            h = jax.nn.silu(layer(h))
        return self.norm(h) + self.embed(ids)

    def conv(self, x):
        return self.conv_in(x)


class TorchTwin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 8), torch.nn.Linear(8, 5)])
        self.norm = torch.nn.LayerNorm(5)
        self.embed = torch.nn.Embedding(10, 5)
        self.register_buffer("position_ids", torch.arange(3))  # a buffer the mapping skips

    def forward(self, x, ids):  # x: NCHW
        h = self.conv_in(x).mean(dim=(2, 3))
        for layer in self.layers:
            h = torch.nn.functional.silu(layer(h))
        return self.norm(h) + self.embed(ids)


def _setup():
    torch.manual_seed(0)
    model = TorchTwin()
    with torch.no_grad():
        model.norm.weight.normal_()
        model.norm.bias.normal_()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    x = np.random.default_rng(0).standard_normal((2, 3, 6, 5)).astype(np.float32)
    ids = np.array([1, 7])
    flax_model = FlaxTwin()
    target = jax.eval_shape(lambda: flax_model.init(jax.random.key(0), jnp.zeros((1, 6, 5, 3)), ids))["params"]
    return model, flax_model, state, target, x, ids


def test_fold_key():
    assert fold_key("up_blocks.1.attentions.0.to_out.0.weight") == ["up_blocks_1", "attentions_0", "to_out_0", "weight"]
    assert fold_key("ff.net.2.bias") == ["ff", "net_2", "bias"]
    assert fold_key("time_embedding.linear_1.weight") == ["time_embedding", "linear_1", "weight"]


def test_layouts_match_torch_numerically():
    model, flax_model, state, target, x, ids = _setup()
    params = torch_to_flax(state, target, what="twin")
    assert params["conv_in"]["kernel"].shape == (3, 3, 3, 4)  # OIHW -> HWIO
    assert params["layers_0"]["kernel"].shape == (4, 8)  # (out, in) -> (in, out)
    assert set(params["norm"]) == {"scale", "bias"} and set(params["embed"]) == {"embedding"}
    with torch.no_grad():
        want = model(torch.from_numpy(x), torch.from_numpy(ids)).numpy()
        want_conv = model.conv_in(torch.from_numpy(x)).numpy()
    x_nhwc = x.transpose(0, 2, 3, 1)
    got = flax_model.apply({"params": params}, x_nhwc, ids)
    got_conv = flax_model.apply({"params": params}, x_nhwc, method="conv")
    np.testing.assert_allclose(np.asarray(got_conv), want_conv.transpose(0, 2, 3, 1), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_casts_to_target_dtype():
    _, _, state, target, _, _ = _setup()
    state = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in state.items()}
    params = torch_to_flax(state, target)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree_util.tree_leaves(params))


def test_every_problem_is_listed_in_one_error():
    _, _, state, target, _, _ = _setup()
    state = dict(state)
    del state["layers.1.bias"]  # missing
    state["layers.2.weight"] = np.zeros((3, 5), np.float32)  # unexpected
    state["conv_in.weight"] = np.zeros((4, 3, 5, 5), np.float32)  # wrong kernel size
    with pytest.raises(ConversionError) as info:
        torch_to_flax(state, target, what="twin.safetensors")
    message = str(info.value)
    assert "twin.safetensors" in message
    assert "missing" in message and "layers_1/bias" in message
    assert "unexpected" in message and "layers.2.weight" in message
    assert "shape mismatch" in message and "conv_in.weight" in message and "(3, 3, 3, 4)" in message
    assert "conv_in/kernel" not in message.split("shape mismatch")[0]  # a mismatch is not also "missing"


def test_two_keys_onto_one_path_are_refused():
    _, _, state, target, _, _ = _setup()
    state = dict(state, **{"layers_0.bias": state["layers.0.bias"]})
    with pytest.raises(ConversionError, match=r"layers_0\.bias \(maps onto layers_0/bias"):
        torch_to_flax(state, target)


def test_flax_to_torch_inverts_the_mapping():
    _, _, state, target, _, _ = _setup()
    back = flax_to_torch(torch_to_flax(state, target))
    expected = {k: v for k, v in state.items() if k != "position_ids"}
    assert set(back) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    unfolded = flax_to_torch({"time_embedding": {"linear_1": {"kernel": np.zeros((2, 3))}}})
    assert {k: v.shape for k, v in unfolded.items()} == {"time_embedding.linear_1.weight": (3, 2)}
