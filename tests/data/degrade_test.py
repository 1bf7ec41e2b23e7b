"""Real-ESRGAN degradation: determinism per (seed, index), configured ranges, kernel properties."""

import numpy as np
import pytest

from configs.common import realesrgan_degradation
from pasd_jax.data import degrade, kernels

CFG = realesrgan_degradation().to_dict()


def _image(h=64, w=80, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / 32.0
    base = 0.5 + 0.4 * np.sin(np.stack([yy, xx, yy + xx], -1) * rng.uniform(1, 3, 3))
    return np.clip(base + 0.05 * rng.standard_normal((h, w, 3)), 0, 1).astype(np.float32)


def test_deterministic_per_seed_and_index():
    hq = _image()
    a = degrade.degrade(hq, np.random.default_rng([7, 3]), CFG)
    b = degrade.degrade(hq, np.random.default_rng([7, 3]), CFG)
    c = degrade.degrade(hq, np.random.default_rng([7, 4]), CFG)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == hq.shape and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(np.round(a * 255) / 255, a)  # 8-bit quantised like PASD


def test_degradation_changes_the_image_but_keeps_content():
    hq = _image()
    lq = degrade.degrade(hq, np.random.default_rng([0, 1]), CFG)
    err = np.abs(lq - hq).mean()
    assert 0.005 < err < 0.3


def test_sampled_parameters_stay_in_configured_ranges():
    draws = [degrade.sample_params(np.random.default_rng([1, i]), CFG) for i in range(400)]
    for p in draws:
        for key in ("kernel1", "kernel2", "sinc"):
            k = p[key]
            assert k.shape == (21, 21) and k.dtype == np.float32
            assert abs(float(k.sum()) - 1.0) < 1e-4
        kind, scale, mode = p["resize1"]
        assert mode in degrade.RESIZE_MODES
        assert {"up": (1.0, 1.5), "down": (0.3, 1.0), "keep": (1.0, 1.0)}[kind][0] <= scale <= \
            {"up": (1.0, 1.5), "down": (0.3, 1.0), "keep": (1.0, 1.0)}[kind][1]
        kind2, scale2, _ = p["resize2"]
        assert 0.6 <= scale2 <= 1.2
        n1, n2 = p["noise1"], p["noise2"]
        assert (1 <= n1["level"] <= 15) if n1["gaussian"] else (0.05 <= n1["level"] <= 2.0)
        assert (1 <= n2["level"] <= 12) if n2["gaussian"] else (0.05 <= n2["level"] <= 1.0)
        assert 60 <= p["jpeg1"] <= 95 and 60 <= p["jpeg2"] <= 100
    frac = lambda f: np.mean([f(p) for p in draws])  # noqa: E731
    assert frac(lambda p: p["second_blur"]) == pytest.approx(0.5, abs=0.08)
    assert frac(lambda p: p["noise1"]["gaussian"]) == pytest.approx(0.5, abs=0.08)
    assert frac(lambda p: p["noise1"]["gray"]) == pytest.approx(0.4, abs=0.08)
    assert frac(lambda p: p["resize1"][0] == "down") == pytest.approx(0.7, abs=0.08)
    identity = frac(lambda p: p["sinc"][10, 10] == 1.0)
    assert identity == pytest.approx(0.2, abs=0.06)  # final sinc with prob 0.8


def test_kernel_shapes_and_symmetry():
    g = kernels.bivariate_gaussian(21, 2.0, 2.0, 0.0)
    np.testing.assert_allclose(g, g.T, atol=1e-7)
    np.testing.assert_allclose(g, g[::-1, ::-1], atol=1e-7)
    assert np.unravel_index(np.argmax(g), g.shape) == (10, 10)
    s = kernels.circular_lowpass_kernel(np.pi / 2, 13, pad_to=21)
    assert s.shape == (21, 21) and abs(float(s.sum()) - 1) < 1e-5
    assert s[:4].max() == 0  # zero padding
    for kind in kernels.KERNEL_TYPES:
        k = kernels.random_mixed_kernel(np.random.default_rng(0), 15, [kind], [1.0], (0.2, 3), (0.5, 4), (1, 2))
        assert k.shape == (15, 15) and abs(float(k.sum()) - 1) < 1e-5 and k.min() >= 0
    with pytest.raises(ValueError):
        kernels.random_mixed_kernel(np.random.default_rng(0), 15, ["box"], [1.0], (0.2, 3), (0.5, 4), (1, 2))


def test_filter2d_matches_direct_correlation():
    img = _image(20, 24)
    k = kernels.bivariate_gaussian(7, 1.0, 2.0, 0.3)
    out = degrade.filter2d(img, k)
    pad = np.pad(img, ((3, 3), (3, 3), (0, 0)), mode="reflect")
    ref = np.zeros_like(img)
    for dy in range(7):
        for dx in range(7):
            ref += k[dy, dx] * pad[dy:dy + 20, dx:dx + 24]
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_grayscale_condition():
    lq = degrade.to_grayscale_condition(_image())
    np.testing.assert_array_equal(lq[..., 0], lq[..., 1])
    np.testing.assert_array_equal(lq[..., 0], lq[..., 2])
