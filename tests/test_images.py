"""load_image / validate_image: each refusal is an ImageError naming the file; valid modes become RGB."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsedge.errors import ImageError
from rsedge.runtime.images import load_image, validate_image


def _rgb_array(width: int = 16, height: int = 12) -> np.ndarray:
    return (np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _write_rgb16_png(path: Path, width: int = 3, height: int = 2) -> None:
    """A 48-bit RGB PNG, which Pillow cannot produce itself (it would open it as 8-bit RGB)."""
    rows = b"".join(b"\x00" + bytes(range(width * 6)) for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )
    path.write_bytes(data)


def _assert_refused(path: Path, *words: str) -> None:
    with pytest.raises(ImageError) as info:
        load_image(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message.lower()


def test_rgb_png_loads_with_identical_pixels(tmp_path: Path) -> None:
    pixels = _rgb_array()
    path = tmp_path / "ok.png"
    Image.fromarray(pixels).save(path)
    img = load_image(str(path))
    assert img.mode == "RGB" and img.size == (16, 12)
    # Fully decoded and detached from the (now closed) file.
    np.testing.assert_array_equal(np.asarray(img), pixels)


def test_missing_file(tmp_path: Path) -> None:
    _assert_refused(tmp_path / "nope.png", "not found")


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    _assert_refused(tmp_path, "not a file")


def test_corrupt_bytes(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.jpg"
    path.write_bytes(b"this is not an image, just some text" * 10)
    _assert_refused(path, "not a readable image")


def test_truncated_png(tmp_path: Path) -> None:
    full = tmp_path / "full.png"
    Image.fromarray(_rgb_array(64, 64)).save(full)
    data = full.read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    _assert_refused(path, "truncated")


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_channel_refused(tmp_path: Path, mode: str) -> None:
    path = tmp_path / f"alpha_{mode}.png"
    Image.new(mode, (8, 8)).save(path)
    _assert_refused(path, "alpha", "flatten")


def test_palette_with_transparency_refused(tmp_path: Path) -> None:
    path = tmp_path / "palette_t.png"
    Image.new("P", (8, 8), 3).save(path, transparency=3)
    _assert_refused(path, "alpha", "flatten")


def test_palette_without_transparency_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "palette.png"
    img = Image.new("P", (8, 8), 1)
    img.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.getpixel((3, 3)) == (10, 20, 30)


def test_16bit_gray_png_refused(tmp_path: Path) -> None:
    path = tmp_path / "gray16.png"
    Image.fromarray(np.arange(48, dtype=np.uint16).reshape(6, 8) * 1000).save(path)
    _assert_refused(path, "8-bit")


def test_16bit_rgb_png_refused(tmp_path: Path) -> None:
    path = tmp_path / "rgb16.png"
    _write_rgb16_png(path)
    assert Image.open(path).mode == "RGB"  # why the raw-mode check is needed
    _assert_refused(path, "16-bit", "8-bit")


def test_float_tiff_refused(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.ones((4, 4), dtype=np.float32)).save(path)
    _assert_refused(path, "8-bit")


@pytest.mark.parametrize("size", [(1, 10), (10, 1)])
def test_too_small_refused(tmp_path: Path, size: tuple[int, int]) -> None:
    path = tmp_path / "thin.png"
    Image.new("RGB", size).save(path)
    _assert_refused(path, "at least 2x2")


def test_grayscale_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "gray.png"
    gray = np.arange(24, dtype=np.uint8).reshape(4, 6) * 10
    Image.fromarray(gray).save(path)
    out = np.asarray(load_image(path))
    assert out.shape == (4, 6, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], gray)


def test_bilevel_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "bw.png"
    Image.new("1", (5, 5), 1).save(path)
    assert load_image(path).getpixel((2, 2)) == (255, 255, 255)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(path, quality=95)
    out = load_image(path)
    assert out.mode == "RGB"
    assert all(v > 245 for v in out.getpixel((4, 4)))  # no ink = white


def test_validate_image_in_memory() -> None:
    gray = Image.new("L", (4, 3), 77)
    out = validate_image(gray)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (77, 77, 77)
    rgb = Image.new("RGB", (4, 3))
    assert validate_image(rgb) is rgb
    with pytest.raises(ImageError, match=r"my-upload.*flatten"):
        validate_image(Image.new("RGBA", (4, 4)), name="my-upload")
    with pytest.raises(ImageError, match="8-bit"):
        validate_image(Image.new("I;16", (4, 4)))
    with pytest.raises(ImageError, match="1x4"):
        validate_image(Image.new("RGB", (1, 4)))
    with pytest.raises(ImageError, match="PIL image"):
        validate_image(np.zeros((4, 4, 3), np.uint8))  # type: ignore[arg-type]
