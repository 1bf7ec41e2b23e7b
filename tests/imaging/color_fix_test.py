"""Colour fixes against a straightforward torch implementation written from PASD_REFERENCE §7.7."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pasd_jax.imaging import color_fix as cf

torch = pytest.importorskip("torch")
F = torch.nn.functional


# ------------------------------------------------------------------ torch oracle (NCHW, from the spec)

def _t_blur(x, r):
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16.0
    kernel = kernel[None, None].repeat(3, 1, 1, 1)                   # [3, 1, 3, 3]
    x = F.pad(x, (r, r, r, r), mode="replicate")
    return F.conv2d(x, kernel, groups=3, dilation=r)


def _t_decompose(x, levels=5):
    high = torch.zeros_like(x)
    for i in range(levels):
        low = _t_blur(x, 2 ** i)
        high += x - low
        x = low
    return high, x


def _t_wavelet_fix(sr, lq):
    return (_t_decompose(sr)[0] + _t_decompose(lq)[1]).clamp(0.0, 1.0)


def _t_adain_fix(sr, lq, eps=1e-5):
    def mean_std(f):
        b, c = f.shape[:2]
        var = f.reshape(b, c, -1).var(dim=2) + eps
        return f.reshape(b, c, -1).mean(dim=2)[..., None, None], var.sqrt()[..., None, None]

    sm, ss = mean_std(sr)
    lm, ls = mean_std(lq)
    return ((sr - sm) / ss * ls + lm).clamp(0.0, 1.0)


def _pair(h, w, b=1, seed=0):
    rng = np.random.default_rng(seed)
    lq = rng.random((b, h, w, 3), dtype=np.float32)
    # SR-like: lq with added detail and a colour shift, partly outside [0, 1] before the fix.
    sr = np.clip(lq * 0.8 + 0.3 * rng.standard_normal((b, h, w, 3)).astype(np.float32) + 0.1, -0.2, 1.2)
    return sr.astype(np.float32), lq


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("h,w,b", [(40, 56, 2), (9, 13, 1), (1, 5, 1), (33, 33, 1)])
def test_wavelet_matches_torch(h, w, b):
    # 9×13 and 1×5 are smaller than the largest dilation (16): the replicate pad exceeds the image.
    sr, lq = _pair(h, w, b)
    ours = np.asarray(jax.jit(cf.wavelet_color_fix)(sr, lq))
    ref = _nhwc(_t_wavelet_fix(_nchw(sr), _nchw(lq)))
    assert ours.shape == sr.shape
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("r", [1, 2, 16])
def test_blur_matches_torch(r):
    x = np.random.default_rng(1).random((1, 12, 20, 3), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(cf.wavelet_blur(jnp.asarray(x), r)),
                               _nhwc(_t_blur(_nchw(x), r)), atol=1e-6, rtol=0)


def test_decomposition_is_exact_split():
    x = np.random.default_rng(2).random((1, 24, 16, 3), dtype=np.float32)
    high, low = cf.wavelet_decomposition(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(high + low), x, atol=1e-5)


@pytest.mark.parametrize("h,w,b", [(40, 56, 2), (7, 3, 1)])
def test_adain_matches_torch(h, w, b):
    sr, lq = _pair(h, w, b, seed=3)
    ours = np.asarray(jax.jit(cf.adain_color_fix)(sr, lq))
    ref = _nhwc(_t_adain_fix(_nchw(sr), _nchw(lq)))
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_unbatched_and_shape_checks():
    sr, lq = _pair(16, 24)
    np.testing.assert_allclose(np.asarray(cf.wavelet_color_fix(sr[0], lq[0])),
                               np.asarray(cf.wavelet_color_fix(sr, lq))[0], atol=1e-7)
    assert cf.adain_color_fix(sr[0], lq[0]).shape == (16, 24, 3)
    with pytest.raises(ValueError, match="same shape"):
        cf.wavelet_color_fix(sr, lq[:, :8])


def test_wavelet_identity_when_same_image():
    _, lq = _pair(32, 40)
    np.testing.assert_allclose(np.asarray(cf.wavelet_color_fix(lq, lq)), lq, atol=1e-5)


def test_uint8_conversions():
    x = jnp.array([-0.1, 0.0, 0.5, 0.999, 1.0, 1.3, 0.7 / 255, 2.5 / 255], jnp.float32)
    # torchvision ToPILImage: x.mul(255).byte() truncates; diffusers numpy_to_pil rounds (half to even).
    t = torch.from_numpy(np.clip(np.asarray(x), 0, 1)).mul(255).byte().numpy()
    np.testing.assert_array_equal(np.asarray(cf.to_uint8_truncate(x)), t)
    np.testing.assert_array_equal(np.asarray(cf.to_uint8_truncate(x)), [0, 0, 127, 254, 255, 255, 0, 2])
    np.testing.assert_array_equal(np.asarray(cf.to_uint8_round(x)), [0, 0, 128, 255, 255, 255, 1, 2])
    assert cf.to_uint8_round(x).dtype == jnp.uint8
