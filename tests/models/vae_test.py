"""VAE: parity with diffusers `AutoencoderKL`, legacy attention-key renaming, SD1.5 key structure."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.mapping import ConversionError, torch_to_flax
from pasd_jax.assembly.paths import flatten
from pasd_jax.models import vae as vae_lib
from pasd_jax.models.configs import UnsupportedConfigError
from tests.torch_oracle import max_diff, nchw, nhwc, randomize_norms, state_dict_numpy

TINY = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
            layers_per_block=1, sample_size=32)


def _abstract(module):
    return jax.eval_shape(lambda: module.init(jax.random.key(0), **module.init_inputs()))["params"]


@pytest.fixture(scope="module")
def tiny():
    """(seeded diffusers VAE with random norms, our module, converted params)."""
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKL as TorchVAE

    torch.manual_seed(0)
    ref = TorchVAE(**TINY).eval()
    randomize_norms(ref)
    ours = vae_lib.from_config(dict(ref.config))
    params = torch_to_flax(state_dict_numpy(ref), _abstract(ours), what="AutoencoderKL")
    return ref, ours, params


def test_encode_matches_diffusers(tiny):
    torch = pytest.importorskip("torch")
    ref, ours, params = tiny
    # Odd height: diffusers' VAE downsampler pads (0, 1) and floors (41 -> 20), not ceil.
    x = torch.rand(2, 3, 41, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
    mean, logvar = jax.jit(lambda p, x: ours.apply({"params": p}, x, method="encode"))(params, nhwc(x))
    assert mean.shape == logvar.shape == (2, 20, 24, 4) and mean.dtype == jnp.float32
    err_mean, err_logvar = max_diff(nchw(mean), dist.mean.numpy()), max_diff(nchw(logvar), dist.logvar.numpy())
    print(f"encode max|Δ| mean {err_mean:.2e} logvar {err_logvar:.2e}")
    assert err_mean <= 1e-4 and err_logvar <= 1e-4


def test_decode_matches_diffusers(tiny):
    torch = pytest.importorskip("torch")
    ref, ours, params = tiny
    z = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref.decode(z).sample.numpy()
    got = jax.jit(lambda p, z: ours.apply({"params": p}, z, method="decode"))(params, nhwc(z))
    assert got.shape == (2, 10, 12, 3)
    err = max_diff(nchw(got), want)
    print(f"decode max|Δ| {err:.2e} (max|want| {np.abs(want).max():.2f})")
    assert err <= 1e-4


def test_legacy_attention_keys_convert_identically(tiny):
    ref, ours, params = tiny
    sd = state_dict_numpy(ref)
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy, renamed = {}, 0
    for key, value in sd.items():
        for new, old in new_to_old.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if key.endswith("weight"):
                    value = value[:, :, None, None]  # the 1×1-conv storage of old checkpoints
                renamed += 1
        legacy[key] = value
    assert renamed == 2 * 2 * 4  # encoder + decoder, 4 projections, weight + bias
    with pytest.raises(ConversionError):
        torch_to_flax(legacy, _abstract(ours))
    converted = torch_to_flax(vae_lib.rename_legacy_vae_keys(legacy), _abstract(ours))
    got, want = flatten(converted), flatten(params)
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], err_msg="/".join(path))
    assert vae_lib.rename_legacy_vae_keys(sd).keys() == sd.keys()  # current names pass through


def test_without_mid_attention_and_quant_convs():
    """`mid_block_add_attention=False`, `use_quant_conv=False`: no such params, still matches."""
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKL as TorchVAE

    torch.manual_seed(3)
    ref = TorchVAE(**dict(TINY, block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                          up_block_types=("UpDecoderBlock2D",), norm_num_groups=8,
                          mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False)).eval()
    randomize_norms(ref)
    ours = vae_lib.from_config(dict(ref.config))
    params = torch_to_flax(state_dict_numpy(ref), _abstract(ours))
    assert "quant_conv" not in params and "attentions_0" not in params["encoder"]["mid_block"]
    x = torch.rand(1, 3, 7, 5, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        want = ref(x).sample.numpy()  # sample_posterior=False: decode(mean)
    assert max_diff(nchw(ours.apply({"params": params}, nhwc(x))), want) <= 1e-4


def test_unsupported_config_is_refused():
    with pytest.raises(UnsupportedConfigError):
        vae_lib.from_config(dict(TINY, latents_mean=[0.0] * 4))
    with pytest.raises(UnsupportedConfigError):
        vae_lib.from_config(dict(TINY, down_block_types=("AttnDownEncoderBlock2D",) * 2))


def test_sd15_vae_keys_and_shapes(reference_dir):
    torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKL as TorchVAE

    config = json.loads((reference_dir / "sd15" / "vae" / "config.json").read_text())
    ours = vae_lib.from_config(config)
    assert ours.scaling_factor == 0.18215 and ours.downscale == 8
    abstract = _abstract(ours)
    with torch.device("meta"):
        ref = TorchVAE.from_config(config)
    fake = {k: np.broadcast_to(np.zeros((), np.float32), tuple(v.shape)) for k, v in ref.state_dict().items()}
    converted = torch_to_flax(fake, abstract, what="sd15 vae")  # strict: keys and shapes
    assert len(flatten(converted)) == len(flatten(abstract))
    assert abstract["encoder"]["mid_block"]["attentions_0"]["to_q"]["kernel"].shape == (512, 512)
    assert abstract["decoder"]["up_blocks_3"]["resnets_2"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
