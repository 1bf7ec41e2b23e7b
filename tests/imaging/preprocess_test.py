"""Pre/post-processing against the reference's PIL calls (PASD_REFERENCE §7.2, §7.7, §7.8)."""

import numpy as np
import pytest
from PIL import Image

from pasd_jax.imaging import preprocess as pp


def _image(h, w, seed=0):
    """Smooth-ish random uint8 [h, w, 3] image (noise on a gradient)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x / w, y / h, (x + y) / (w + h)], -1) * 200
    return np.clip(base + rng.integers(0, 56, (h, w, 3)), 0, 255).astype(np.uint8)


def _reference_chain(rgb, upscale, process_size):
    """`test_pasd.py` steps 2–4 transcribed with PIL (torchvision Resize sizes hand-computed)."""
    img = Image.fromarray(rgb)
    w, h = img.size
    img = img.resize((w * upscale, h * upscale))            # PIL default filter: bicubic
    w, h = img.size
    if min(w, h) < process_size:
        short, long = min(w, h), max(w, h)
        new = (process_size, int(process_size * long / short))
        img = img.resize(new if w <= h else new[::-1], Image.BILINEAR)
    w, h = img.size
    img = img.resize((w // 8 * 8, h // 8 * 8))
    return np.asarray(img, np.float32) / 255.0


@pytest.mark.parametrize("w,h,upscale,ps", [(100, 60, 2, 128), (60, 100, 1, 128), (150, 100, 1, 64),
                                            (37, 29, 4, 96), (64, 48, 1, 32)])
def test_prepare_input_matches_reference_chain(w, h, upscale, ps):
    rgb = _image(h, w)
    lq, info = pp.prepare_input(rgb, upscale=upscale, process_size=ps)
    ref = _reference_chain(rgb, upscale, ps)
    assert lq.dtype == np.float32 and lq.shape == ref.shape
    np.testing.assert_array_equal(lq, ref)
    assert lq.shape[0] % 8 == 0 and lq.shape[1] % 8 == 0
    assert info.orig_size == (w, h) and info.target_size == (w * upscale, h * upscale)
    assert info.processed_size == (lq.shape[1], lq.shape[0])


def test_prepare_input_sizes_and_passthrough():
    _, info = pp.prepare_input(_image(60, 100), upscale=2, process_size=128)
    # 200×120 → short side 128, long int(128·200/120) = 213 → 208×128.
    assert info.resized_size == (213, 128) and info.processed_size == (208, 128)
    rgb = _image(48, 64)
    lq, info = pp.prepare_input(rgb, process_size=32)  # large enough, multiples of 8: untouched
    np.testing.assert_array_equal(lq, rgb / np.float32(255))
    assert info.resized_size == info.processed_size == info.target_size == (64, 48)
    with pytest.raises(ValueError, match="upscale"):
        pp.prepare_input(rgb, upscale=0)
    with pytest.raises(ValueError, match="uint8"):
        pp.prepare_input(rgb.astype(np.float32))


@pytest.mark.parametrize("w,h,size,max_size,expected", [
    (300, 500, 768, None, (768, 1280)), (500, 300, 768, None, (1280, 768)), (50, 50, 768, None, (768, 768)),
    (100, 1000, 768, 1536, (153, 1536)), (1000, 100, 768, 1536, (1536, 153)), (333, 500, 768, 1536, (768, 1153)),
    (3, 7, 10, None, (10, 23))])
def test_torchvision_resize_size(w, h, size, max_size, expected):
    assert pp.torchvision_resize_size(w, h, size, max_size) == expected


def test_finalize_output():
    rgb = _image(30, 50)
    lq, info = pp.prepare_input(rgb, upscale=2, process_size=64)
    sr_u8 = (lq * 255).round().astype(np.uint8)
    out = pp.finalize_output(sr_u8, info)
    assert out.dtype == np.uint8 and out.shape == (60, 100, 3)
    expected = np.asarray(Image.fromarray(sr_u8).resize((100, 60), Image.BICUBIC))
    np.testing.assert_array_equal(out, expected)
    # float input: "round" (plain pipeline) vs "truncate" (after the wavelet fix).
    np.testing.assert_array_equal(pp.finalize_output(lq, info), expected)
    trunc = np.asarray(Image.fromarray((np.clip(lq, 0, 1) * 255).astype(np.uint8)).resize((100, 60), Image.BICUBIC))
    np.testing.assert_array_equal(pp.finalize_output(lq, info, rounding="truncate"), trunc)
    np.testing.assert_array_equal(pp.float_to_uint8(np.array([0.5 / 255, 1.5 / 255, 0.999, 2.0])), [0, 2, 255, 255])
    np.testing.assert_array_equal(pp.float_to_uint8(np.array([1.7 / 255, 0.999, -1.0]), rounding="truncate"),
                                  [1, 254, 0])


def test_prepare_grayscale_input():
    gray = _image(100, 300)[..., 0]
    lq, info = pp.prepare_grayscale_input(gray, process_size=64)
    # 300×100 → long int(64·3) = 192 > 128 → short int(128·64/192) = 42 → 128×42 → 128×40.
    assert info.resized_size == (128, 42) and info.processed_size == (128, 40)
    assert lq.shape == (40, 128, 3) and info.upscale == 1 and info.target_size == (300, 100)
    np.testing.assert_array_equal(lq[..., 0], lq[..., 1])
    ref = Image.fromarray(gray).convert("RGB").resize((128, 42), Image.BILINEAR).resize((128, 40), Image.BICUBIC)
    np.testing.assert_array_equal(lq, np.asarray(ref, np.float32) / 255)
    # Always resized, also when larger than process_size; RGB input is reduced to luma first.
    lq2, info2 = pp.prepare_grayscale_input(np.repeat(gray[..., None], 3, -1), process_size=32)
    # 300×100 → long 96 > max 64 → short int(64·32/96) = 21 → 64×21 → 64×16.
    assert info2.resized_size == (64, 21) and info2.processed_size == (64, 16) and lq2.shape == (16, 64, 3)


def test_yuv_conversions():
    rgb = _image(20, 20, seed=4)
    yuv = pp.rgb_to_yuv(rgb)
    y = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    np.testing.assert_array_equal(yuv[..., 0], np.floor(y + 0.5).astype(np.uint8))
    back = pp.yuv_to_rgb(yuv)
    ok = (yuv[..., 1:] > 0).all(-1) & (yuv[..., 1:] < 255).all(-1)   # U, V not saturated
    assert ok.mean() > 0.8 and np.abs(back[ok].astype(int) - rgb[ok]).max() <= 2
    g = np.full((2, 2, 3), 77, np.uint8)
    np.testing.assert_array_equal(pp.rgb_to_yuv(g), np.broadcast_to([77, 128, 128], (2, 2, 3)))


def test_resize_bilinear_cv2_semantics():
    a = np.array([[0, 10, 20, 30]], np.uint8)[..., None]
    np.testing.assert_array_equal(pp.resize_bilinear_cv2(a, 2, 1)[0, :, 0], [5, 25])   # pair averages
    np.testing.assert_array_equal(pp.resize_bilinear_cv2(a[:, :2], 4, 1)[0, :, 0], [0, 3, 8, 10])
    img = _image(9, 7)
    np.testing.assert_array_equal(pp.resize_bilinear_cv2(img, 7, 9), img)


def test_merge_chroma():
    gray = _image(30, 20, seed=5)[..., 0]
    colour = np.empty((64, 48, 3), np.uint8)
    colour[...] = (150, 110, 90)
    out = pp.merge_chroma(colour, gray)
    assert out.shape == (30, 20, 3) and out.dtype == np.uint8
    yuv_out, yuv_sr = pp.rgb_to_yuv(out), pp.rgb_to_yuv(colour)
    mid = (gray > 40) & (gray < 215)                      # away from RGB saturation
    assert np.abs(yuv_out[..., 0][mid].astype(int) - gray[mid]).max() <= 2
    assert np.abs(yuv_out[mid][:, 1:].astype(int) - yuv_sr[0, 0, 1:]).max() <= 2
    # A neutral SR result leaves exactly the original gray image.
    neutral = np.full((64, 48, 3), 100, np.uint8)
    np.testing.assert_array_equal(pp.merge_chroma(neutral, gray), np.repeat(gray[..., None], 3, -1))
    # The original may also be given as RGB.
    np.testing.assert_array_equal(pp.merge_chroma(neutral, np.repeat(gray[..., None], 3, -1)),
                                  np.repeat(gray[..., None], 3, -1))
