"""Preprocessing: SigLIP normalisation parity with transformers, and LLaVA-NeXT's anyres tiling."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rsedge.runtime.preprocess import (
    anyres_grid_shape,
    divide_to_tiles,
    normalize,
    possible_resolutions,
    preprocess_anyres,
    preprocess_square,
    resize_and_pad,
    select_best_resolution,
)

OV_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]


def _random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _hf_processor(size: int):
    transformers = pytest.importorskip("transformers")
    from transformers.image_utils import PILImageResampling

    # The PIL backend is what LLaVA's SigLipImageProcessor does; the torchvision one (used when
    # torchvision is installed) resizes differently.
    cls = getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
    return cls(
        size={"height": size, "width": size},
        resample=PILImageResampling.BICUBIC,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )


@pytest.mark.parametrize(("width", "height", "size"), [(57, 31, 24), (300, 200, 384), (384, 384, 384)])
def test_normalize_matches_transformers(width: int, height: int, size: int) -> None:
    img = _random_image(width, height, seed=width)
    expected = np.asarray(_hf_processor(size)(img, return_tensors="np")["pixel_values"][0])
    got = normalize(img, size)
    assert got.shape == (3, size, size) and got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-6


def test_normalize_hand_values() -> None:
    img = Image.new("RGB", (5, 5), (0, 128, 255))
    out = normalize(img, 5)
    assert np.all(out[0] == -1.0)
    assert np.allclose(out[1], 128 / 255 * 2 - 1, atol=1e-7)
    assert np.all(out[2] == 1.0)


def test_preprocess_square_shape_and_grayscale() -> None:
    gray = Image.new("L", (40, 20), 255)
    out = preprocess_square(gray, 16)
    assert out.shape == (1, 3, 16, 16) and np.all(out == 1.0)


def test_possible_resolutions_forms() -> None:
    assert possible_resolutions(OV_PINPOINTS, 384) == [tuple(p) for p in OV_PINPOINTS]
    # LLaVA-NeXT's range string: width multiplier outer, height inner.
    assert possible_resolutions("(1x1),...,(6x6)", 384) == [tuple(p) for p in OV_PINPOINTS]
    # The tile edge may be given as image_size (ViT patch first).
    assert possible_resolutions("(1x1),...,(2x3)", 14, 384)[:3] == [(384, 384), (384, 768), (384, 1152)]
    # Upstream quirk kept: only the first and last pair count, so this is a 2x2 range, not 2 entries.
    assert possible_resolutions("(1x1),(2x2)", 10) == [(10, 10), (10, 20), (20, 10), (20, 20)]
    assert possible_resolutions("[[384, 768], [768, 384]]", 384) == [(384, 768), (768, 384)]
    with pytest.raises(ValueError):
        possible_resolutions([], 384)


def test_select_best_resolution_hand_cases() -> None:
    small = [(384, 384), (768, 384), (384, 768)]
    # 800x400: (768, 384) keeps 768*384 pixels, the others 384*192.
    assert select_best_resolution((800, 400), small) == (768, 384)
    # Tiny image: every candidate keeps all 100*100 pixels; the least waste wins.
    assert select_best_resolution((100, 100), [(768, 768), (384, 384)]) == (384, 384)
    # Full tie: the first one listed wins.
    assert select_best_resolution((100, 100), [(384, 768), (768, 384)]) == (384, 768)
    assert select_best_resolution((768, 768), OV_PINPOINTS) == (768, 768)
    assert select_best_resolution((2304, 2304), OV_PINPOINTS) == (2304, 2304)
    assert select_best_resolution((5000, 5000), OV_PINPOINTS) == (2304, 2304)


def test_anyres_grid_shape() -> None:
    # 760x380 fits (768, 384) whole with the least waste.
    assert anyres_grid_shape((760, 380), OV_PINPOINTS, 384) == (2, 1)
    # 800x400 does not fit 768 wide: upscaling into (1152, 768) keeps every pixel, so it wins.
    assert anyres_grid_shape((800, 400), OV_PINPOINTS, 384) == (3, 2)
    assert anyres_grid_shape((768, 768), OV_PINPOINTS, 384) == (2, 2)
    assert anyres_grid_shape((380, 1140), "(1x1),...,(6x6)", 384) == (1, 3)


def test_resize_and_pad_centres_on_black() -> None:
    # 100x50 into 384x384: width fills, height = ceil(50 * 3.84) = 192, pasted at y = 96.
    padded = np.asarray(resize_and_pad(Image.new("RGB", (100, 50), (200, 100, 50)), (384, 384)))
    assert padded.shape == (384, 384, 3)
    assert np.all(padded[:96] == 0) and np.all(padded[288:] == 0)
    assert np.all(padded[96:288] == (200, 100, 50))


def test_resize_and_pad_uses_ceil() -> None:
    # 3x7 into 10x10: scale_h = 10/7 < scale_w, width = ceil(3 * 10/7) = ceil(4.28) = 5, x offset 2.
    padded = np.asarray(resize_and_pad(Image.new("RGB", (3, 7), (255, 255, 255)), (10, 10)))
    assert np.all(padded[:, 2:7] == 255) and np.all(padded[:, :2] == 0) and np.all(padded[:, 7:] == 0)


def test_divide_to_tiles_row_major() -> None:
    img = Image.new("RGB", (4, 4))
    for colour, box in enumerate([(0, 0, 2, 2), (2, 0, 4, 2), (0, 2, 2, 4), (2, 2, 4, 4)]):
        img.paste((colour * 50, 0, 0), box)
    tiles = divide_to_tiles(img, 2)
    assert [t.getpixel((0, 0))[0] for t in tiles] == [0, 50, 100, 150]


def test_preprocess_anyres_exact_tiles_and_base() -> None:
    # 768x384 matches the (768, 384) pinpoint exactly, so the tiles are plain crops of the image.
    img = _random_image(768, 384, seed=3)
    out = preprocess_anyres(img, 384, OV_PINPOINTS)
    assert out.shape == (3, 3, 384, 384) and out.dtype == np.float32
    np.testing.assert_array_equal(out[1], normalize(img.crop((0, 0, 384, 384)), 384))
    np.testing.assert_array_equal(out[2], normalize(img.crop((384, 0, 768, 384)), 384))
    # The base is squashed to 384x384 (no padding); check it against transformers too.
    expected_base = np.asarray(_hf_processor(384)(img, return_tensors="np")["pixel_values"][0])
    assert np.abs(out[0] - expected_base).max() <= 1e-6


def test_preprocess_anyres_pads_with_black() -> None:
    # 300x100 into the single 384x384 pinpoint: 384x128 content at y = 128, black above and below.
    img = _random_image(300, 100, seed=4)
    out = preprocess_anyres(img, 384, [[384, 384]])
    assert out.shape == (2, 3, 384, 384)
    tile = out[1]
    assert np.all(tile[:, :128] == -1.0) and np.all(tile[:, 256:] == -1.0)
    expected = np.asarray(img.resize((384, 128), Image.BICUBIC), dtype=np.float32) / 255 * 2 - 1
    np.testing.assert_allclose(tile[:, 128:256].transpose(1, 2, 0), expected, atol=1e-6)


def test_preprocess_anyres_string_pinpoints_grid() -> None:
    img = _random_image(100, 300, seed=5)
    out = preprocess_anyres(img, 32, "(1x1),...,(3x3)")
    num_w, num_h = anyres_grid_shape(img.size, "(1x1),...,(3x3)", 32)
    assert (num_w, num_h) == (1, 3)
    assert out.shape == (1 + num_w * num_h, 3, 32, 32)
