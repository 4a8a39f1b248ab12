"""Visual-token merging: numpy runtime vs the torch twin, hand-checked shapes and token counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rsedge.models.rsunivlm.merge import merge_anyres_torch, merge_square_torch, unpad_image_torch
from rsedge.runtime.features import (
    anyres_map_shape,
    anyres_token_count,
    downsample_size,
    merge_anyres,
    merge_square,
    parse_max_patches,
    square_token_count,
    unpad_bounds,
    visual_token_count,
)
from rsedge.runtime.preprocess import anyres_grid_shape

OV_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]


def _features(views: int, tokens: int, hidden: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((views, tokens, hidden)).astype(np.float32),
        rng.standard_normal(hidden).astype(np.float32),
    )


def test_merge_square_appends_newline() -> None:
    feats, newline = _features(1, 729, 8)
    out = merge_square(feats, newline)
    assert out.shape == (730, 8) == (square_token_count(729), 8)
    np.testing.assert_array_equal(out[:729], feats[0])
    np.testing.assert_array_equal(out[729], newline)
    torch_out = merge_square_torch(torch.from_numpy(feats), torch.from_numpy(newline))
    np.testing.assert_array_equal(torch_out.numpy(), out)
    with pytest.raises(ValueError):
        merge_square(np.concatenate([feats, feats]), newline)


def test_unpad_bounds_hand_cases() -> None:
    # 1000x500 image on a 54x54 map: content height int(500 * 54/1000) = 27, padding (54-27)//2 = 13 on
    # each side, so the odd remainder keeps 28 rows.
    assert unpad_bounds(54, 54, (1000, 500)) == ((13, 41), (0, 54))
    # Tall image: padding on the width.
    assert unpad_bounds(54, 54, (500, 1000)) == ((0, 54), (13, 41))
    # Same aspect ratio: nothing removed.
    assert unpad_bounds(54, 108, (800, 400)) == ((0, 54), (0, 108))
    # 369x820 on an 81x27 map: 820 * 27/369 = 59.999999... LLaVA truncates to 59 (padding 11); HF's
    # round() would give 60 (padding 10) and two more rows.
    assert unpad_bounds(81, 27, (369, 820)) == ((11, 70), (0, 27))
    fmap = torch.arange(81 * 27, dtype=torch.float32).reshape(1, 81, 27)
    assert unpad_image_torch(fmap, (369, 820)).shape == (1, 59, 27)


def test_downsample_size() -> None:
    assert downsample_size(162, 162, 9, 27) == (81, 81)  # times = 2
    assert downsample_size(54, 54, 9, 27) is None  # times < 1
    assert downsample_size(162, 162, None, 27) is None  # plain anyres never shrinks
    # times = sqrt(89*89 / 6561) = 1.0988: kept, the threshold is 1.1.
    assert downsample_size(89, 89, 9, 27) is None
    # times = sqrt(90*89 / 6561) = 1.1049: 90 // t = 81, 89 // t = 80.
    assert downsample_size(90, 89, 9, 27) == (81, 80)
    # times should be 10/9 but the float sqrt lands a hair above, so 90 // times is 80, not 81; upstream
    # has the same float arithmetic, so we keep it.
    assert downsample_size(90, 90, 9, 27) == (80, 80)


def test_parse_max_patches() -> None:
    assert parse_max_patches("anyres_max_9") == 9
    assert parse_max_patches("anyres") is None
    assert parse_max_patches("square") is None


@pytest.mark.parametrize(
    ("size_wh", "views", "expected"),
    [((768, 768), 5, 729 + 54 * 55), ((2304, 2304), 37, 729 + 81 * 82)],
)
def test_known_onevision_token_counts(size_wh: tuple[int, int], views: int, expected: int) -> None:
    num_w, num_h = anyres_grid_shape(size_wh, OV_PINPOINTS, 384)
    assert 1 + num_w * num_h == views
    feats, newline = _features(views, 729, 8)
    out = merge_anyres(feats, newline, size_wh, OV_PINPOINTS, 384, 9)
    assert out.shape == (expected, 8)
    feats_t, newline_t = torch.from_numpy(feats), torch.from_numpy(newline)
    torch_out = merge_anyres_torch(feats_t, newline_t, size_wh, OV_PINPOINTS, 384, 9)
    assert tuple(torch_out.shape) == (expected, 8)
    assert anyres_token_count(size_wh, OV_PINPOINTS, 384, 729, 9) == expected
    assert visual_token_count(size_wh, "anyres_max_9", OV_PINPOINTS) == expected
    assert visual_token_count(size_wh, "square") == 730


def test_merge_anyres_layout_without_downsampling() -> None:
    # 2x1 grid of 2x2-token tiles with hidden 1 and distinct values: check stitch order, newline
    # column and base tokens in front by hand.
    pins = [[8, 4]]
    feats = np.arange(3 * 4, dtype=np.float32).reshape(3, 4, 1)  # base 0..3, tile A 4..7, tile B 8..11
    newline = np.array([-1.0], dtype=np.float32)
    out = merge_anyres(feats, newline, (8, 4), pins, 4, None)[:, 0]
    expected = [0, 1, 2, 3, 4, 5, 8, 9, -1, 6, 7, 10, 11, -1]
    np.testing.assert_array_equal(out, expected)
    torch_out = merge_anyres_torch(torch.from_numpy(feats), torch.from_numpy(newline), (8, 4), pins, 4, None)
    np.testing.assert_array_equal(torch_out[:, 0].numpy(), expected)


CASES = [
    # (image w, h), pinpoints, tile size, tokens per view, max patches
    ((2304, 2304), OV_PINPOINTS, 384, 729, 9),  # 6x6 grid, times 2
    ((1500, 700), OV_PINPOINTS, 384, 729, 9),  # wide, unpad rows, downsample
    ((700, 1500), OV_PINPOINTS, 384, 729, 9),  # tall, unpad columns
    ((2000, 500), OV_PINPOINTS, 384, 729, 4),  # very wide, small budget
    ((369, 820), OV_PINPOINTS, 384, 729, 9),  # int() vs round() unpad case
    ((640, 480), "(1x1),...,(3x3)", 32, 16, 2),  # tiny tiles, string pinpoints
    ((333, 517), [[32, 32], [64, 32], [32, 64], [64, 64], [96, 64]], 32, 16, 1),
    ((1500, 700), OV_PINPOINTS, 384, 729, None),  # plain anyres: unpad only
]


@pytest.mark.parametrize(("size_wh", "pins", "tile", "tokens", "max_patches"), CASES)
def test_numpy_matches_torch(
    size_wh: tuple[int, int],
    pins,
    tile: int,
    tokens: int,
    max_patches: int | None,
) -> None:
    num_w, num_h = anyres_grid_shape(size_wh, pins, tile)
    feats, newline = _features(1 + num_w * num_h, tokens, 6, seed=size_wh[0])
    out = merge_anyres(feats, newline, size_wh, pins, tile, max_patches)
    feats_t, newline_t = torch.from_numpy(feats), torch.from_numpy(newline)
    ref = merge_anyres_torch(feats_t, newline_t, size_wh, pins, tile, max_patches)
    assert out.shape == tuple(ref.shape)
    assert out.dtype == np.float32
    assert np.abs(out - ref.numpy()).max() <= 1e-5
    assert out.shape[0] == anyres_token_count(size_wh, pins, tile, tokens, max_patches)


def test_cases_cover_downsampling_and_unpadding() -> None:
    # Guard the parametrised parity test against losing its interesting cases.
    downsampled = unpadded = 0
    for size_wh, pins, tile, tokens, max_patches in CASES:
        unit = int(tokens**0.5)
        num_w, num_h = anyres_grid_shape(size_wh, pins, tile)
        (r0, r1), (c0, c1) = unpad_bounds(num_h * unit, num_w * unit, size_wh)
        unpadded += (r1 - r0, c1 - c0) != (num_h * unit, num_w * unit)
        downsampled += downsample_size(r1 - r0, c1 - c0, max_patches, unit) is not None
    assert downsampled >= 4 and unpadded >= 4


def test_downsample_matches_torch_interpolate_values() -> None:
    # A linear ramp stays a ramp under bilinear resizing: check one value by hand too.
    feats = np.zeros((37, 729, 1), dtype=np.float32)
    ramp = np.tile(np.arange(162, dtype=np.float32), (162, 1))  # value = column index
    # Scatter the ramp into the tiles so the stitched map is the ramp.
    tiles = ramp.reshape(6, 27, 6, 27).transpose(0, 2, 1, 3).reshape(36, 729, 1)
    feats[1:] = tiles
    out = merge_anyres(feats, np.zeros(1, np.float32), (2304, 2304), OV_PINPOINTS, 384, 9)
    first_row = out[729 : 729 + 81, 0]
    # Half-pixel centres, scale 2: output column j samples input 2j + 0.5.
    np.testing.assert_allclose(first_row, np.arange(81) * 2 + 0.5, atol=1e-5)


def test_wrong_tile_count_is_an_error() -> None:
    feats, newline = _features(4, 729, 4)  # 768x768 needs 4 tiles + base = 5 views
    with pytest.raises(ValueError, match="tiles"):
        merge_anyres(feats, newline, (768, 768), OV_PINPOINTS, 384, 9)


def test_map_shape_369x820() -> None:
    assert anyres_map_shape((369, 820), OV_PINPOINTS, 384, 27, 9) == (59, 27)
    assert visual_token_count((369, 820), "anyres_max_9", OV_PINPOINTS) == 729 + 59 * 28
