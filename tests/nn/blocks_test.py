"""Block-level parity of `pasd_jax.nn` against diffusers (fp32, ~1e-5 per block)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pasd_jax.nn.attention import Attention, Transformer2DModel
from pasd_jax.nn.resnet import Conv2d, Downsample2D, ResnetBlock2D, Upsample2D, nearest_resize
from pasd_jax.nn.unet_blocks import CrossAttnDownBlock2D, CrossAttnUpBlock2D, UpBlock2D
from tests.torch_oracle import assert_close, flax_params_from_torch, nchw, nhwc, randomize_norms

torch = pytest.importorskip("torch")
from diffusers.models.attention_processor import Attention as TorchAttention  # noqa: E402
from diffusers.models.resnet import Downsample2D as TorchDownsample2D  # noqa: E402
from diffusers.models.resnet import ResnetBlock2D as TorchResnetBlock2D  # noqa: E402
from diffusers.models.resnet import Upsample2D as TorchUpsample2D  # noqa: E402
from diffusers.models.transformers.transformer_2d import Transformer2DModel as TorchTransformer2D  # noqa: E402
from diffusers.models.unets import unet_2d_blocks as tblocks  # noqa: E402


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cin,cout", [(32, 32), (32, 64)])
def test_resnet_block(cin, cout):
    torch.manual_seed(0)
    ref = TorchResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=16, groups=16, eps=1e-5).eval()
    randomize_norms(ref)
    x, temb = _randn(2, cin, 7, 5), _randn(2, 16, seed=1)
    ours = ResnetBlock2D(cin, cout, 16, groups=16)
    params = flax_params_from_torch(ref, ours, nhwc(x), temb.numpy())
    got = ours.apply({"params": params}, nhwc(x), temb.numpy())
    assert_close(nchw(got), ref(x, temb).detach().numpy())


@pytest.mark.parametrize("size,stride", [((2, 2), 1), ((1, 1), 1), ((2, 1), 2), ((2, 2), 2)])
def test_conv_on_input_smaller_than_kernel(size, stride):
    """A 3×3 conv on a 1×1 / 2×2 input (SD's lowest level at small latents) goes through the
    patches·kernel path: torch's Conv2d values, nn.Conv's parameter tree, and no operand-swapped
    (weight-reversing) convolution in the compiled program."""
    torch.manual_seed(0)
    ref = torch.nn.Conv2d(24, 20, 3, stride=stride, padding=1).eval()
    x = _randn(2, 24, *size)
    ours = Conv2d(20, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)))
    params = flax_params_from_torch(ref, ours, nhwc(x))
    got = ours.apply({"params": params}, nhwc(x))
    assert_close(nchw(got), ref(x).detach().numpy())
    plain = jax.eval_shape(lambda: nn.Conv(20, (3, 3), padding=((1, 1), (1, 1))).init(jax.random.key(0), nhwc(x)))
    assert jax.tree_util.tree_map(jnp.shape, plain["params"]) == jax.tree_util.tree_map(jnp.shape, params)
    hlo = jax.jit(lambda p, x: ours.apply({"params": p}, x)).lower(params, nhwc(x)).compile().as_text()
    assert "convolution(" not in hlo and "reverse" not in hlo


@pytest.mark.parametrize("size", [(8, 6), (7, 5)])
def test_downsample_symmetric_padding(size):
    torch.manual_seed(0)
    ref = TorchDownsample2D(16, use_conv=True, out_channels=16, padding=1).eval()
    x = _randn(1, 16, *size)
    ours = Downsample2D(16, padding=1)
    params = flax_params_from_torch(ref, ours, nhwc(x))
    got = ours.apply({"params": params}, nhwc(x))
    assert_close(nchw(got), ref(x).detach().numpy())


@pytest.mark.parametrize("out_size", [None, (12, 15), (17, 12)])
def test_upsample_to_size(out_size):
    torch.manual_seed(0)
    ref = TorchUpsample2D(16, use_conv=True, out_channels=16).eval()
    in_size = (6, 8) if out_size in (None, (12, 15)) else (9, 6)
    x = _randn(1, 16, *in_size)
    ours = Upsample2D(16)
    params = flax_params_from_torch(ref, ours, nhwc(x))
    got = ours.apply({"params": params}, nhwc(x), out_size)
    want = ref(x, output_size=out_size).detach().numpy()
    assert got.shape[1:3] == want.shape[2:]
    assert_close(nchw(got), want)


def test_nearest_resize_matches_torch_floor_index():
    x = np.arange(2 * 5 * 3 * 1, dtype=np.float32).reshape(2, 5, 3, 1)
    for size in [(9, 5), (10, 6), (3, 7), (17, 4)]:
        want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size, mode="nearest")
        assert np.array_equal(nchw(nearest_resize(jnp.asarray(x), size)), want.numpy())


@pytest.mark.parametrize("cross", [None, 24])
def test_attention(cross):
    torch.manual_seed(0)
    ref = TorchAttention(query_dim=32, heads=4, dim_head=8, cross_attention_dim=cross).eval()
    x = _randn(2, 11, 32)
    ctx = _randn(2, 5, cross, seed=1) if cross else None
    ours = Attention(32, 4, 8, cross_attention_dim=cross)
    args = (x.numpy(),) + ((ctx.numpy(),) if cross else ())
    params = flax_params_from_torch(ref, ours, *args)
    got = ours.apply({"params": params}, *args)
    assert_close(got, ref(x, ctx).detach().numpy())


@pytest.mark.parametrize("blocks", [(3, 2), (4, 7), (16, 16)])
def test_chunked_attention_is_exact(blocks):
    """Online-softmax blocks (ragged T and S: padded queries, masked keys) equal XLA's attention,
    values and gradients."""
    from pasd_jax.nn import attention

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 11, 4, 8), (2, 7, 4, 8), (2, 7, 4, 8)))
    want = jax.nn.dot_product_attention(q, k, v, scale=0.3)
    got = attention.chunked_attention(q, k, v, 0.3, *blocks)
    assert got.shape == (2, 11, 4, 8)
    np.testing.assert_allclose(got, want, atol=1e-6)
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
    g_want = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=0.3)), (0, 1, 2))(q, k, v)
    g_got = jax.grad(loss(lambda q, k, v: attention.chunked_attention(q, k, v, 0.3, *blocks)), (0, 1, 2))(q, k, v)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_chunked_attention_folded_reductions(dtype, backend, monkeypatch):
    """Key blocks longer than 32 take the folded row max and the row sums inside p·[v, 1] on a
    CPU (the plain reductions elsewhere, here forced with backend "tpu") and, in float32, the
    scale on q: still XLA's attention, with ragged keys masked inside a folded block."""
    from pasd_jax.nn import attention

    monkeypatch.setattr(attention.jax, "default_backend", lambda: backend)
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(3 * rng.standard_normal(s), jnp.float32) for s in ((2, 200, 2, 8), (2, 300, 2, 8),
                                                                              (2, 300, 2, 8)))
    q, k, v = (a.astype(dtype) for a in (q, k, v))
    want = jax.nn.dot_product_attention(*(a.astype(jnp.float32) for a in (q, k, v)), scale=0.35)
    got = attention.chunked_attention(q, k, v, 0.35, 64, 128)
    assert got.dtype == dtype
    tol = 2e-5 if dtype == jnp.float32 else 3e-2  # bfloat16: probabilities rounded before p·v
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tol, rtol=tol)
    folded = attention._fold_last(jnp.arange(128.0)[None], jnp.maximum)
    assert folded.shape == (1, 32) and float(folded.max()) == 127.0


def test_attend_selects_chunked_above_threshold(monkeypatch):
    """"auto" switches to the chunked kernel (a scan in the jaxpr) above CHUNK_THRESHOLD; "xla" never."""
    from pasd_jax.nn import attention

    q = jax.ShapeDtypeStruct((1, 64, 2, 8), jnp.float32)
    has_scan = lambda: "scan" in str(jax.make_jaxpr(lambda q: attention.attend(q, q, q, 0.5))(q))
    monkeypatch.setattr(attention, "CHUNK_THRESHOLD", 2 * 64 * 64 - 1)
    assert has_scan()
    monkeypatch.setattr(attention, "CHUNK_THRESHOLD", 2 * 64 * 64)
    assert not has_scan()
    monkeypatch.setattr(attention, "_implementation", "chunked")
    assert has_scan()
    with pytest.raises(ValueError, match="attention implementation"):
        attention.set_attention_implementation("flash")


@pytest.mark.parametrize("linear", [False, True])
def test_transformer2d(linear):
    torch.manual_seed(0)
    ref = TorchTransformer2D(num_attention_heads=2, attention_head_dim=16, in_channels=32, num_layers=2,
                             cross_attention_dim=24, norm_num_groups=16, use_linear_projection=linear,
                             upcast_attention=linear).eval()
    randomize_norms(ref)
    x, ctx = _randn(2, 32, 5, 7), _randn(2, 6, 24, seed=1)
    ours = Transformer2DModel(32, 2, 16, num_layers=2, cross_attention_dim=24, norm_num_groups=16,
                              use_linear_projection=linear, upcast_attention=linear)
    params = flax_params_from_torch(ref, ours, nhwc(x), ctx.numpy())
    got = ours.apply({"params": params}, nhwc(x), ctx.numpy())
    want = ref(x, encoder_hidden_states=ctx).sample.detach().numpy()
    assert_close(nchw(got), want)


def test_cross_attn_down_block():
    torch.manual_seed(0)
    ref = tblocks.CrossAttnDownBlock2D(in_channels=16, out_channels=32, temb_channels=20, num_layers=2,
                                       resnet_groups=8, num_attention_heads=2, cross_attention_dim=24,
                                       add_downsample=True, downsample_padding=1).eval()
    randomize_norms(ref)
    x, temb, ctx = _randn(1, 16, 9, 6), _randn(1, 20, seed=1), _randn(1, 4, 24, seed=2)
    ours = CrossAttnDownBlock2D(in_channels=16, out_channels=32, temb_channels=20, num_layers=2, resnet_groups=8,
                                heads=2, cross_attention_dim=24)
    args = (nhwc(x), temb.numpy(), ctx.numpy())
    params = flax_params_from_torch(ref, ours, *args)
    h, skips = ours.apply({"params": params}, *args)
    want_h, want_skips = ref(x, temb, encoder_hidden_states=ctx)
    assert_close(nchw(h), want_h.detach().numpy())
    assert len(skips) == len(want_skips) == 3
    for got, want in zip(skips, want_skips):
        assert_close(nchw(got), want.detach().numpy())


@pytest.mark.parametrize("cross_attn", [False, True])
def test_stock_up_blocks_with_odd_upsample_size(cross_attn):
    torch.manual_seed(0)
    common = dict(in_channels=16, prev_output_channel=32, out_channels=32, temb_channels=20, num_layers=3,
                  resnet_groups=8, add_upsample=True)
    if cross_attn:
        ref = tblocks.CrossAttnUpBlock2D(num_attention_heads=2, cross_attention_dim=24, **common).eval()
        ours = CrossAttnUpBlock2D(heads=2, cross_attention_dim=24, **common)
    else:
        ref = tblocks.UpBlock2D(**common).eval()
        ours = UpBlock2D(**common)
    randomize_norms(ref)
    h, temb, ctx = _randn(1, 32, 4, 3), _randn(1, 20, seed=1), _randn(1, 4, 24, seed=2)
    skips = (_randn(1, 16, 4, 3, seed=3), _randn(1, 32, 4, 3, seed=4), _randn(1, 32, 4, 3, seed=5))
    args = (nhwc(h), tuple(nhwc(s) for s in skips), temb.numpy(), ctx.numpy(), None, (7, 5))
    params = flax_params_from_torch(ref, ours, *args)
    got = ours.apply({"params": params}, *args)
    kwargs = dict(encoder_hidden_states=ctx) if cross_attn else {}
    want = ref(h, skips, temb, upsample_size=(7, 5), **kwargs).detach().numpy()
    assert got.shape == (1, 7, 5, 32)
    assert_close(nchw(got), want)
