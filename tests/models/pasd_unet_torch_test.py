"""`benchmarks/torch_pasd.py` (the PyTorch PASD UNet that `cfg_step.py --torch pasd` times) is the
network ours is: the reference's key names and shapes at SD1.5 size, and our Flax PASD UNet's
outputs through our converter on a tiny config."""

import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest

from pasd_jax.fixtures import diffusers_kwargs
from pasd_jax.fixtures.tiny import tiny_unet_config
from pasd_jax.models import unet as unet_lib
from tests.torch_oracle import assert_close, flax_params_from_torch, nchw, nhwc, randomize_norms

_PATH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "torch_pasd.py"


def _torch_pasd():
    spec = importlib.util.spec_from_file_location("torch_pasd", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torch_pasd_unet_has_the_reference_keys_and_shapes(reference_dir):
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel

    ref = json.loads((reference_dir / "keys" / "pasd_unet.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_kwargs(ref["config"]))
        _torch_pasd().add_pixel_attentions(unet)
    got = {k: list(v.shape) for k, v in unet.state_dict().items()}
    assert got == {k: list(v) for k, v in ref["keys"].items()}


def test_torch_pasd_unet_matches_ours():
    torch = pytest.importorskip("torch")
    from diffusers import UNet2DConditionModel

    tp = _torch_pasd()
    config = tiny_unet_config("pasd")
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**diffusers_kwargs(config)).eval()
    tp.add_pixel_attentions(ref)
    randomize_norms(ref)
    ours = unet_lib.from_config(config)
    assert ours.family == "pasd"
    gen = torch.Generator().manual_seed(1)
    hw = (16, 16)
    x = torch.randn(2, 4, *hw, generator=gen)
    t = torch.tensor([999, 10])
    text = torch.randn(2, 7, config["cross_attention_dim"], generator=gen)
    sizes, chans = ours.skip_sizes(*hw), ours.skip_channels()
    down = [0.5 * torch.randn(2, c, h, w, generator=gen) for (h, w), c in zip(sizes, chans)]
    mid = 0.5 * torch.randn(2, chans[-1], *sizes[-1], generator=gen)
    with torch.no_grad():
        want = tp.pasd_unet_forward(ref, x, t, text, down, mid).numpy()
        zero = tp.pasd_unet_forward(ref, x, t, text, [0 * d for d in down], 0 * mid).numpy()
    assert np.abs(want - zero).max() > 1e-2  # the residuals (skips and PACA contexts) matter
    params = flax_params_from_torch(ref, ours, **ours.init_inputs())
    got = jax.jit(lambda p, *a, **k: ours.apply({"params": p}, *a, **k))(
        params, nhwc(x), t.numpy().astype(np.int32), text.numpy(),
        down_block_additional_residuals=[nhwc(d) for d in down], mid_block_additional_residual=nhwc(mid))
    assert_close(nchw(got), want, atol=1e-5, rtol=1e-4)
