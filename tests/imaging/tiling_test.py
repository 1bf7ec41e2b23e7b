"""Latent tiling geometry, Gaussian weights and the numpy blending oracle (PASD_REFERENCE §7.5)."""

import numpy as np
import pytest

from pasd_jax.imaging import tiling


def _reference_grid(h, w, tile, overlap):
    """The pipeline's loops, transcribed (with an iteration cap instead of hanging)."""
    tile = min(tile, h, w)
    rows, cur = 0, 0
    while cur < w:
        cur = max(rows * tile - overlap * rows, 0) + tile
        rows += 1
        assert rows < 10_000
    cols, cur = 0, 0
    while cur < h:
        cur = max(cols * tile - overlap * cols, 0) + tile
        cols += 1
        assert cols < 10_000
    out = []
    for row in range(rows):
        for col in range(cols):
            if col < cols - 1 or row < rows - 1:
                ofs_x = max(row * tile - overlap * row, 0)
                ofs_y = max(col * tile - overlap * col, 0)
            if row == rows - 1:
                ofs_x = w - tile
            if col == cols - 1:
                ofs_y = h - tile
            out.append((ofs_y, ofs_x))
    return out


SIZES = [(320, 320, 320, 8), (321, 320, 320, 8), (400, 700, 320, 8), (96, 1000, 320, 8),
         (1000, 50, 320, 8), (640, 632, 320, 8), (5, 9, 320, 2), (17, 200, 64, 16), (313, 313, 64, 0)]


@pytest.mark.parametrize("h,w,tile,overlap", SIZES)
def test_origins_match_reference_loops(h, w, tile, overlap):
    assert tiling.tile_origins(h, w, tile, overlap) == _reference_grid(h, w, tile, overlap)


@pytest.mark.parametrize("h,w,tile,overlap", SIZES)
def test_tiles_cover_latent_within_bounds(h, w, tile, overlap):
    t = tiling.effective_tile(h, w, tile)
    cover = np.zeros((h, w), int)
    origins = tiling.tile_origins(h, w, tile, overlap)
    for y, x in origins:
        assert 0 <= y <= h - t and 0 <= x <= w - t
        cover[y:y + t, x:x + t] += 1
    assert cover.min() >= 1
    assert len(set(origins)) == len(origins)


@pytest.mark.parametrize("h,w,tile,overlap,count,t", [
    (320, 320, 320, 8, 1, 320), (400, 700, 320, 8, 2 * 3, 320), (96, 1000, 320, 8, 12, 96),
    (5, 9, 320, 2, 1 * 3, 5), (632, 632, 320, 8, 2 * 2, 320), (633, 633, 320, 8, 3 * 3, 320)])
def test_tile_count(h, w, tile, overlap, count, t):
    # R = smallest r ≥ 1 with (r−1)(T−ov) + T ≥ w: 632 = 312 + 320 fits in 2, 633 needs 3.
    assert tiling.effective_tile(h, w, tile) == t
    assert len(tiling.tile_origins(h, w, tile, overlap)) == count


def test_order_is_x_outer_y_inner():
    origins = tiling.tile_origins(400, 700, 320, 8)
    assert origins == [(0, 0), (80, 0), (0, 312), (80, 312), (0, 380), (80, 380)]


def test_degenerate_overlap_refused_and_needs_tiling():
    with pytest.raises(ValueError, match="overlap"):
        tiling.tile_origins(4, 9, 320, 8)  # T = 4 ≤ overlap: the reference would hang
    assert tiling.tile_origins(4, 4, 320, 8) == [(0, 0)]
    assert tiling.needs_tiling(321, 320, 320) and not tiling.needs_tiling(320, 320, 320)
    assert not tiling.needs_tiling(96, 96, 320)


def test_gaussian_weights_formula_and_centres():
    t = 6
    wgt = tiling.gaussian_weights(t, t, dtype=np.float64)
    var = 0.01
    wx = [np.exp(-(i - (t - 1) / 2) ** 2 / t ** 2 / (2 * var)) / np.sqrt(2 * np.pi * var) for i in range(t)]
    wy = [np.exp(-(j - t / 2) ** 2 / t ** 2 / (2 * var)) / np.sqrt(2 * np.pi * var) for j in range(t)]
    np.testing.assert_allclose(wgt, np.outer(wy, wx), rtol=1e-15)
    assert np.argmax(wgt[:, 0]) == t // 2                         # y peak at T/2 (reference quirk)
    np.testing.assert_allclose(wgt[0, :], wgt[0, ::-1])             # x symmetric about (T-1)/2
    sym = tiling.gaussian_weights(t, t, reference_centres=False, dtype=np.float64)
    np.testing.assert_allclose(sym, sym.T)
    np.testing.assert_allclose(sym, sym[::-1])
    w32 = tiling.gaussian_weights(5, 7)
    assert w32.dtype == np.float32 and w32.shape == (5, 7) and w32.min() > 0


def test_blend_constant_and_weighted_average():
    h, w, tile, ov = 40, 70, 32, 8
    origins = tiling.tile_origins(h, w, tile, ov)
    t = tiling.effective_tile(h, w, tile)
    wgt = tiling.gaussian_weights(t, t, dtype=np.float64)
    const = np.full((len(origins), 2, t, t, 4), 0.25, np.float32)
    np.testing.assert_allclose(tiling.blend(const, origins, wgt, h, w), 0.25, rtol=1e-6)

    rng = np.random.default_rng(0)
    tiles = rng.standard_normal((len(origins), 2, t, t, 4)).astype(np.float32)
    out = tiling.blend(tiles, origins, wgt, h, w)
    assert out.shape == (2, h, w, 4) and out.dtype == np.float32
    num = np.zeros((2, h, w, 4))
    den = np.zeros((2, h, w, 4))
    for tl, (y, x) in zip(tiles, origins):
        num[:, y:y + t, x:x + t] += tl * wgt[None, :, :, None]
        den[:, y:y + t, x:x + t] += wgt[None, :, :, None]
    np.testing.assert_allclose(out, num / den, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[:, 0, 0], tiles[0][:, 0, 0], rtol=1e-6)  # only tile 0 covers (0, 0)


def test_blend_shape_errors():
    wgt = tiling.gaussian_weights(8, 8)
    with pytest.raises(ValueError, match="origins"):
        tiling.blend(np.zeros((2, 1, 8, 8, 4)), [(0, 0)], wgt, 8, 8)
    with pytest.raises(ValueError, match="does not fit"):
        tiling.blend(np.zeros((1, 1, 8, 8, 4)), [(1, 0)], wgt, 8, 8)
