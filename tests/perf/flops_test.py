"""FLOP counter: exact counts for single primitives and control flow, and parity with torch's counter."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pasd_jax.perf import flops, peak


def test_conv_exact():
    """3×3 conv 8→16 on [2, 10, 12, 8], SAME: 2·(2·10·12·16)·(3·3·8) FLOPs; grouped conv divides."""
    x = jax.ShapeDtypeStruct((2, 10, 12, 8), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 8, 16), jnp.float32)
    nhwc = ("NHWC", "HWIO", "NHWC")
    conv = lambda x, w, g=1: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=nhwc,
                                                          feature_group_count=g)
    assert flops.count_flops(conv, x, w) == 2 * (2 * 10 * 12 * 16) * (3 * 3 * 8)
    wg = jax.ShapeDtypeStruct((3, 3, 2, 16), jnp.float32)  # 4 groups of 2 input channels
    assert flops.count_flops(conv, x, wg, g=4) == 2 * (2 * 10 * 12 * 16) * (3 * 3 * 2)
    strided = lambda x, w: jax.lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)),
                                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert flops.count_flops(strided, x, w) == 2 * (2 * 5 * 6 * 16) * (3 * 3 * 8)


def test_dense_exact_and_backward():
    """x [4, 5, 6] @ w [6, 7] (+ bias, not counted): 2·4·5·6·7; the gradient wrt x and w adds 2× that."""
    x = jax.ShapeDtypeStruct((4, 5, 6), jnp.float32)
    w = jax.ShapeDtypeStruct((6, 7), jnp.float32)
    fwd = 2 * 4 * 5 * 6 * 7
    assert flops.count_flops(lambda x, w: x @ w + 1.0, x, w) == fwd
    grad = jax.grad(lambda x, w: jnp.sum(x @ w), argnums=(0, 1))
    assert flops.count_flops(grad, x, w) == 3 * fwd
    only_x = jax.grad(lambda x, w: jnp.sum(x @ w))  # w frozen: no dW
    assert flops.count_flops(only_x, x, w) == 2 * fwd


def test_attention_exact():
    """jax.nn.dot_product_attention q [2, 9, 3, 4], k/v [2, 11, 3, 4]: 2·B·N·T·S·(H + Hv)."""
    q = jax.ShapeDtypeStruct((2, 9, 3, 4), jnp.float32)
    kv = jax.ShapeDtypeStruct((2, 11, 3, 4), jnp.float32)
    want = 2 * 2 * 3 * 9 * 11 * (4 + 4)
    assert flops.count_flops(jax.nn.dot_product_attention, q, kv, kv) == want
    assert flops.attention_flops((2, 9, 3, 4), (2, 11, 3, 4), (2, 11, 3, 4)) == want


def test_attention_module_subtotal():
    """Our Attention: 4 projections + the attention core, which the breakdown also reports apart."""
    from pasd_jax.nn.attention import Attention

    attn = Attention(query_dim=8, heads=2, dim_head=4, cross_attention_dim=6)
    x, ctx = jax.ShapeDtypeStruct((1, 10, 8), jnp.float32), jax.ShapeDtypeStruct((1, 5, 6), jnp.float32)
    params = jax.eval_shape(lambda: attn.init(jax.random.key(0), jnp.zeros((1, 10, 8)), jnp.zeros((1, 5, 6))))
    parts = flops.flop_breakdown(lambda p, x, c: attn.apply(p, x, c), params, x, ctx)
    core = 2 * 1 * 2 * 10 * 5 * (4 + 4)
    proj = 2 * 10 * 8 * 8 + 2 * 2 * 5 * 6 * 8 + 2 * 10 * 8 * 8  # to_q, to_k + to_v, to_out
    assert parts[flops.ATTENTION_SCOPE] == core
    assert flops.count_flops(lambda p, x, c: attn.apply(p, x, c), params, x, ctx) == core + proj


def test_fused_attention_primitive_counted():
    """The cuDNN primitive (traced abstractly; lowering needs a GPU) counts like the XLA path."""
    fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    q = jax.ShapeDtypeStruct((2, 9, 3, 4), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 11, 3, 4), jnp.bfloat16)

    def call(q, k, v):
        unused = jnp.zeros(0, q.dtype)  # how the library passes absent bias / lengths / offsets
        return fused._dot_product_attention_fwd_p_wrapper.bind(
            q, k, v, *[unused] * 7, scale=0.5, seed=0, dropout_rate=0.0,
            variadic_args=(False, False), mask_type=fused.MaskType.NO_MASK,
            layout=fused.AttentionLayout.BTNH.value, sliding_window_length=None, is_training=False)

    try:
        jaxpr = jax.make_jaxpr(call)(q, kv, kv)
    except Exception as err:  # private API: skip (not fail) when its signature moves
        pytest.skip(f"cuDNN attention primitive not traceable here: {err}")
    got = flops.jaxpr_flop_breakdown(jaxpr)
    want = 2 * 2 * 3 * 9 * 11 * 8
    assert got == {"fused_attention": want, flops.ATTENTION_SCOPE: want}


def test_scan_map_fori_remat_cond_and_calls():
    """Bodies are multiplied by trip counts; cond takes the dearest branch; wrappers are entered."""
    a = jax.ShapeDtypeStruct((3, 4), jnp.float32)
    b = jax.ShapeDtypeStruct((4, 4), jnp.float32)
    mm = 2 * 3 * 4 * 4

    def scanned(a, b):
        return jax.lax.scan(lambda c, _: (c @ b, None), a, None, length=5)[0]

    assert flops.count_flops(scanned, a, b) == 5 * mm
    assert flops.count_flops(lambda a, b: jax.lax.fori_loop(0, 7, lambda i, c: c @ b, a), a, b) == 7 * mm
    stack = jax.ShapeDtypeStruct((6, 3, 4), jnp.float32)
    assert flops.count_flops(lambda s, b: jax.lax.map(lambda x: x @ b, s), stack, b) == 6 * mm
    assert flops.count_flops(jax.checkpoint(lambda a, b: jnp.sin(a @ b)), a, b) == mm
    assert flops.count_flops(jax.jit(lambda a, b: (a @ b) @ b), a, b) == 2 * mm
    cond = lambda p, a, b: jax.lax.cond(p, lambda: (a @ b) @ b, lambda: a)
    assert flops.count_flops(cond, jax.ShapeDtypeStruct((), jnp.bool_), a, b) == 2 * mm
    relu = jax.custom_jvp(lambda x: x @ b_const)
    b_const = jnp.ones((4, 4))
    relu.defjvp(lambda p, t: (relu(*p), t[0] @ b_const))
    assert flops.count_flops(relu, a) == mm


def test_while_trip_count():
    """A counted while with literal bounds is exact; an unknown one warns and counts one trip."""
    a = jax.ShapeDtypeStruct((3, 4), jnp.float32)
    b = jax.ShapeDtypeStruct((4, 4), jnp.float32)
    mm = 2 * 3 * 4 * 4

    def counted(a, b):
        return jax.lax.while_loop(lambda c: c[0] < 4, lambda c: (c[0] + 1, c[1] @ b), (0, a))[1]

    def carried_bound(a, b):  # i < n with n a loop-invariant carry
        return jax.lax.while_loop(lambda c: c[0] < c[1], lambda c: (c[0] + 1, c[1], c[2] @ b), (1, 4, a))[2]

    assert flops.count_flops(counted, a, b) == 4 * mm
    assert flops.count_flops(carried_bound, a, b) == 3 * mm

    def unknown(n, a, b):
        return jax.lax.fori_loop(0, n, lambda i, c: c @ b, a)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert flops.count_flops(unknown, jax.ShapeDtypeStruct((), jnp.int32), a, b) == mm
    assert any("unknown trip count" in str(w.message) for w in caught)


def test_stock_unet_matches_torch_flop_counter():
    """Our stock UNet (tiny config, abstract params) vs torch.utils.flop_counter on diffusers' UNet."""
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel as TorchUNet
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    from pasd_jax.assembly import registry
    from pasd_jax.fixtures import diffusers_kwargs, tiny

    config = tiny.tiny_unet_config("stock")
    ref = TorchUNet(**diffusers_kwargs(config)).eval()
    # torch's counter has no rule for the CPU SDPA kernel (it counts 0): use the bmm processor.
    ref.set_attn_processor(AttnProcessor())
    b, side, length = 2, 16, 7
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ref(torch.zeros(b, 4, side, side), torch.tensor([10, 10]), torch.zeros(b, length, 32))
    want = counter.get_total_flops()

    model = registry.build_module(config)
    params = registry.abstract_params(model)
    got = flops.count_flops(lambda p, x, t, c: model.apply({"params": p}, x, t, c), params,
                            jax.ShapeDtypeStruct((b, side, side, 4), jnp.float32),
                            jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b, length, 32), jnp.float32))
    assert abs(got - want) <= 0.01 * want, (got, want)


def test_peak_table_and_mfu():
    assert peak.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak.peak_tflops("NVIDIA H200", jnp.float32) == 494.5
    assert peak.peak_tflops("TPU v5 lite") == 197.0
    assert peak.peak_tflops("TPU v6e") == 918.0
    assert peak.peak_tflops("cpu") is None
    assert peak.peak_tflops("cpu", override=12.5) == 12.5
    assert peak.mfu(989e12, 2.0, 989.0) == pytest.approx(0.5)
    assert peak.mfu(1e12, 1.0, None) is None
    assert np.isfinite(float(peak.describe(1e12, 1.0, None).split()[0]))
