"""UNet: parity with diffusers `UNet2DConditionModel` on non-uniform configs, full-size key structure."""

import functools
import json

import jax
import numpy as np
import pytest

from convert.mapping import torch_to_flax
from pasd_jax.assembly.paths import flatten
from pasd_jax.models import unet as unet_lib
from tests.torch_oracle import flax_params_from_torch, max_diff, nchw, nhwc, randomize_norms

# Test-only XLA CPU options: ~1.5× faster compiles; errors stay at the 1e-6 level.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
VARIANT_FAMILY = {"pasd": "pasd", "pasd_rrdb": "pasd", "pasd_light": "pasd_light", "pasd_light_rrdb": "pasd_light"}


def _torch_parity(config: dict, latent_hw, residuals: bool) -> float:
    """Seeded diffusers UNet vs ours (stock family) on a [2, 4, h, w] latent; returns max |Δ|."""
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(0)
    ref = TorchUNet(**config).eval()
    randomize_norms(ref)
    ours = unet_lib.from_config(dict(ref.config))
    assert ours.family == "stock"
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *latent_hw, generator=gen)
    t = torch.tensor([999, 10])
    ctx = torch.randn(2, 7, ours.cross_dims()[0], generator=gen)
    kwargs, jkwargs = {}, {}
    if residuals:
        sizes, chans = ours.skip_sizes(*latent_hw), ours.skip_channels()
        down = [0.5 * torch.randn(2, c, h, w, generator=gen) for (h, w), c in zip(sizes, chans)]
        mid = 0.5 * torch.randn(2, chans[-1], *sizes[-1], generator=gen)
        kwargs = dict(down_block_additional_residuals=tuple(down), mid_block_additional_residual=mid)
        jkwargs = dict(down_block_additional_residuals=[nhwc(d) for d in down],
                       mid_block_additional_residual=nhwc(mid))
    with torch.no_grad():
        want = ref(x, t, ctx, **kwargs).sample.numpy()
    params = flax_params_from_torch(ref, ours, **ours.init_inputs())
    args = (params, nhwc(x), t.numpy().astype(np.int32), ctx.numpy())
    apply = jax.jit(lambda p, *a, **k: ours.apply({"params": p}, *a, **k))
    got = apply.lower(*args, **jkwargs).compile(FAST_COMPILE)(*args, **jkwargs)
    assert got.shape == (2, *latent_hw, 4)
    return max_diff(nchw(got), want)


def test_stock_unet_matches_diffusers_distinct_widths():
    """Hidden-golden-like shape: distinct widths, per-block heads, cross dim 24, odd 17×12 latent."""
    config = dict(sample_size=16, block_out_channels=(32, 48, 64, 64), norm_num_groups=16,
                  attention_head_dim=(1, 2, 4, 4), cross_attention_dim=24, layers_per_block=2)
    assert _torch_parity(config, (17, 12), residuals=True) <= 1e-4


def test_sd2_style_unet_matches_diffusers():
    """SD2.x options: linear projections, per-block head tuple, upcast attention, cross dim 40."""
    config = dict(sample_size=16, block_out_channels=(32, 48, 64, 64), norm_num_groups=16,
                  attention_head_dim=(2, 4, 8, 8), cross_attention_dim=40, layers_per_block=1,
                  use_linear_projection=True, upcast_attention=True)
    assert _torch_parity(config, (13, 10), residuals=False) <= 1e-4


# ---- full-size (SD1.5) parameter trees vs the reference key dumps --------------------------
@functools.lru_cache(maxsize=None)
def _abstract(family: str, config_json: str):
    module = unet_lib.from_config(json.loads(config_json), family=family)
    return jax.eval_shape(lambda: module.init(jax.random.key(0), **module.init_inputs()))["params"]


def _sd15_config(reference_dir) -> str:
    return (reference_dir / "sd15" / "unet" / "config.json").read_text()


def _zeros_state(keys: dict) -> dict:
    return {k: np.broadcast_to(np.float32(0), shape) for k, shape in keys.items()}


@pytest.mark.parametrize("variant", sorted(VARIANT_FAMILY))
def test_full_size_unet_keys(reference_dir, variant):
    ref = json.loads((reference_dir / "keys" / f"{variant}_unet.json").read_text())
    abstract = _abstract(VARIANT_FAMILY[variant], _sd15_config(reference_dir))
    torch_to_flax(_zeros_state(ref["keys"]), abstract, what=f"{variant}_unet")  # strict names + shapes
    flat = flatten(abstract)
    assert len(flat) == ref["num_keys"]
    assert sum(int(np.prod(s.shape)) for s in flat.values()) == ref["num_params"]


def test_stock_unet_keys_are_pasd_minus_pixel_attentions(reference_dir):
    keys = json.loads((reference_dir / "keys" / "pasd_unet.json").read_text())["keys"]
    extra = json.loads((reference_dir / "keys" / "diff_vs_stock_diffusers.json").read_text())["pasd"]
    stock_keys = {k: v for k, v in keys.items() if ".pixel_attentions." not in k}
    assert set(keys) - set(stock_keys) == set(extra["unet_extra_vs_stock"])
    abstract = _abstract("stock", _sd15_config(reference_dir))
    torch_to_flax(_zeros_state(stock_keys), abstract, what="stock_unet")
    assert len(flatten(abstract)) == len(stock_keys)
