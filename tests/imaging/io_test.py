"""Image reading / listing / writing: modes, EXIF, transparency, 16 bit, CMYK, corrupt files, atomic writes."""

import os

import numpy as np
import pytest
from PIL import Image

from pasd_jax.imaging import io as iio


def _gradient(h=24, w=40):
    """A uint8 [h, w, 3] test image with distinct rows / columns / channels."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], -1).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".webp", ".bmp", ".tif"])
def test_lossless_rgb_roundtrip(tmp_path, suffix):
    rgb = _gradient()
    path = tmp_path / f"a{suffix}"
    kwargs = {"lossless": True} if suffix == ".webp" else {}
    Image.fromarray(rgb).save(path, **kwargs)
    loaded = iio.load_image(path)
    assert loaded.rgb.dtype == np.uint8 and loaded.rgb.shape == (24, 40, 3)
    np.testing.assert_array_equal(loaded.rgb, rgb)
    assert not loaded.was_grayscale and loaded.source_mode == "RGB" and loaded.path == path
    assert loaded.rgb.flags.writeable


def test_jpeg_and_read_image(tmp_path):
    rgb = _gradient()
    Image.fromarray(rgb).save(tmp_path / "a.JPG", quality=98)
    out = iio.read_image(tmp_path / "a.JPG")
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - rgb).mean() < 4


def test_exif_orientation_applied(tmp_path):
    rgb = _gradient(16, 32)  # landscape on disk, tagged "rotate 90 CW" (orientation 6) → portrait
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    Image.fromarray(rgb).save(path, exif=exif, quality=98)
    out = iio.read_image(path)
    assert out.shape == (32, 16, 3)
    expected = np.asarray(Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_270))
    assert np.abs(out.astype(int) - expected).mean() < 4


def test_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((8, 10, 4), np.uint8)
    rgba[..., 0] = 200                    # red under...
    rgba[:, :5, 3] = 0                    # ...fully transparent → white
    rgba[:, 5:, 3] = 255                  # opaque → the colour itself
    rgba[0, 5, 3] = 128                   # half transparent → blend
    Image.fromarray(rgba).save(tmp_path / "a.png")
    loaded = iio.load_image(tmp_path / "a.png")
    assert loaded.source_mode == "RGBA" and not loaded.was_grayscale
    np.testing.assert_array_equal(loaded.rgb[:, :5], 255)
    np.testing.assert_array_equal(loaded.rgb[1:, 5:], np.broadcast_to([200, 0, 0], (7, 5, 3)))
    np.testing.assert_allclose(loaded.rgb[0, 5], [228, 127, 127], atol=1)


def test_la_and_palette_transparency(tmp_path):
    la = Image.new("LA", (6, 4), (50, 255))
    la.putpixel((0, 0), (50, 0))
    la.save(tmp_path / "la.png")
    loaded = iio.load_image(tmp_path / "la.png")
    assert loaded.was_grayscale and loaded.source_mode == "LA"
    assert tuple(loaded.rgb[0, 0]) == (255, 255, 255) and tuple(loaded.rgb[1, 1]) == (50, 50, 50)

    pal = Image.new("P", (6, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.save(tmp_path / "p.png", transparency=0)
    rgb = iio.read_image(tmp_path / "p.png")
    assert tuple(rgb[0, 0]) == (255, 255, 255) and tuple(rgb[2, 3]) == (10, 200, 30)


def test_grayscale_flagged(tmp_path):
    gray = _gradient()[..., 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    loaded = iio.load_image(tmp_path / "g.png")
    assert loaded.was_grayscale and loaded.source_mode == "L" and loaded.rgb.shape == (24, 40, 3)
    for c in range(3):
        np.testing.assert_array_equal(loaded.rgb[..., c], gray)


def test_16bit_png_scaled_not_clipped(tmp_path):
    v = np.array([[0, 257, 32896, 65535], [128, 129, 40000, 1000]], np.uint16)
    Image.fromarray(v).save(tmp_path / "g16.png")
    loaded = iio.load_image(tmp_path / "g16.png")
    assert loaded.source_mode.startswith("I") and loaded.was_grayscale
    expected = np.round(v / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(loaded.rgb[..., 0], expected)
    assert loaded.rgb[0, 2, 0] == 128 and loaded.rgb[0, 3, 0] == 255


def test_cmyk_jpeg(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:, :4] = (255, 0, 0)
    rgb[:, 4:] = (0, 0, 255)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=100)
    loaded = iio.load_image(tmp_path / "c.jpg")
    assert loaded.source_mode == "CMYK" and loaded.rgb.shape == (8, 8, 3)
    assert np.abs(loaded.rgb.astype(int) - rgb).max() < 16


def test_corrupt_and_non_image_files(tmp_path):
    buf = tmp_path / "full.png"
    Image.fromarray(_gradient(64, 64)).save(buf)
    data = buf.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (tmp_path / "notes.txt").write_text("hello")
    for name in ["trunc.png", "junk.jpg", "notes.txt", "missing.png"]:
        with pytest.raises(iio.ImageReadError) as e:
            iio.read_image(tmp_path / name)
        assert name in str(e.value) and e.value.path == tmp_path / name and e.value.reason
    with pytest.raises(iio.ImageReadError, match="not a regular file"):
        iio.read_image(tmp_path)


def test_list_images(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.JPEG", "d.webp", "e.tif", "f.TIFF", "g.bmp"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "._a.png").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "z.png").write_bytes(b"")
    names = [p.name for p in iio.list_images(tmp_path)]
    assert names == ["a.jpg", "b.PNG", "c.JPEG", "d.webp", "e.tif", "f.TIFF", "g.bmp"]
    assert iio.list_images(tmp_path / "a.jpg") == [tmp_path / "a.jpg"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        iio.list_images(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no images"):
        iio.list_images(_empty(tmp_path))


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "readme.txt").write_text("x")
    return d


def test_write_image_roundtrip_and_no_overwrite(tmp_path):
    rgb = _gradient()
    out = tmp_path / "o.png"
    assert iio.write_image(out, rgb) == out
    np.testing.assert_array_equal(iio.read_image(out), rgb)
    with pytest.raises(FileExistsError, match="o.png"):
        iio.write_image(out, np.zeros_like(rgb))
    np.testing.assert_array_equal(iio.read_image(out), rgb)     # untouched
    iio.write_image(out, np.zeros_like(rgb), overwrite=True)
    np.testing.assert_array_equal(iio.read_image(out), 0)
    iio.write_image(tmp_path / "o.jpg", rgb)
    assert Image.open(tmp_path / "o.jpg").format == "JPEG"
    iio.write_image(tmp_path / "o.webp", rgb)
    assert Image.open(tmp_path / "o.webp").format == "WEBP"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.jpg", "o.png", "o.webp"]  # no temp files


def test_write_image_failures_leave_nothing(tmp_path, monkeypatch):
    rgb = _gradient()
    with pytest.raises(ValueError, match="suffix"):
        iio.write_image(tmp_path / "o.unknownext", rgb)
    with pytest.raises(ValueError, match="uint8"):
        iio.write_image(tmp_path / "o.png", rgb.astype(np.float32))
    with pytest.raises(FileNotFoundError):
        iio.write_image(tmp_path / "missing_dir" / "o.png", rgb)

    def boom(self, fp, *a, **k):
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        iio.write_image(tmp_path / "o.png", rgb)
    assert os.listdir(tmp_path) == []
