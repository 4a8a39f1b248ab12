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


# -- EXIF orientation, the pixel cap, multi-band rasters -------------------------------------------------------


def _write_tiff(path: Path, arr: np.ndarray, photometric: int, extra: tuple[int, ...] = ()) -> None:
    """A minimal little-endian baseline TIFF (one uncompressed strip, interleaved samples), of layouts Pillow
    cannot write: N-band and multi-band 16-bit rasters such as a satellite scene's."""
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    height, width = arr.shape[:2]
    samples = 1 if arr.ndim == 2 else arr.shape[2]
    data = arr.tobytes()
    fmt = {"u": 1, "i": 2, "f": 3}[arr.dtype.kind]
    tags = [
        (256, 4, [width]),
        (257, 4, [height]),
        (258, 3, [arr.dtype.itemsize * 8] * samples),
        (259, 3, [1]),
        (262, 3, [photometric]),
        (273, 4, [0]),  # strip offset, filled in below
        (277, 3, [samples]),
        (278, 4, [height]),
        (279, 4, [len(data)]),
        (284, 3, [1]),
        *([(338, 3, list(extra))] if extra else []),
        (339, 3, [fmt] * samples),
    ]
    blobs_at = 8 + 2 + 12 * len(tags) + 4
    blobs = b""
    entries = []
    for tag, kind, values in tags:
        payload = struct.pack("<" + ("H" if kind == 3 else "I") * len(values), *values)
        if len(payload) <= 4:
            entries.append([tag, kind, len(values), payload.ljust(4, b"\0")])
        else:
            entries.append([tag, kind, len(values), struct.pack("<I", blobs_at + len(blobs))])
            blobs += payload
    next(e for e in entries if e[0] == 273)[3] = struct.pack("<I", blobs_at + len(blobs))
    ifd = struct.pack("<H", len(tags)) + b"".join(struct.pack("<HHI", *e[:3]) + e[3] for e in entries) + b"\0" * 4
    path.write_bytes(b"II*\0" + struct.pack("<I", 8) + ifd + blobs + data)


def _rotated_jpeg(path: Path) -> None:
    """A 40x20 JPEG stored sideways: red left half, blue right half, EXIF orientation 6 (turn 90 degrees
    clockwise to view), so a viewer shows it 20 wide and 40 high, red on top."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, quality=95, exif=exif)


def test_exif_orientation_is_honoured(tmp_path: Path) -> None:
    path = tmp_path / "sideways.jpg"
    _rotated_jpeg(path)
    img = load_image(path)
    assert img.size == (20, 40)
    top, bottom = np.asarray(img)[5, 10].astype(int), np.asarray(img)[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    with Image.open(path) as opened:  # an already-open image is turned the same way
        assert validate_image(opened).size == (20, 40)


def test_boxes_and_overlays_use_the_frame_a_viewer_shows(tmp_path: Path, tiny_bundle) -> None:
    from rsedge.runtime.outputs import Box
    from rsedge.runtime.overlay import write_overlay
    from rsedge.runtime.pipeline import Answer, Pipeline

    path = tmp_path / "sideways.jpg"
    _rotated_jpeg(path)
    ans = Pipeline.load(tiny_bundle).generate([path], "[VG] Where is the field?", max_new_tokens=2)
    assert ans.image_sizes == [(20, 40)]  # the size [VG] boxes are scaled to
    boxed = Answer(text="[0, 0, 50, 50]", tokens=[1], tag="[VG]", expert=1, boxes=[Box(0, 0, 10, 20)])
    out = write_overlay(boxed, [path], tmp_path / "overlay.png")
    assert out is not None
    with Image.open(out) as drawn:
        assert drawn.size == (20, 40)


def _jpeg_claiming(path: Path, width: int, height: int) -> None:
    """A tiny JPEG whose frame header claims ``width`` x ``height``: what a decompression bomb looks like."""
    Image.new("RGB", (16, 16), (40, 80, 120)).save(path, quality=90)
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))


def test_pixel_cap_refuses_before_decoding(tmp_path: Path, monkeypatch) -> None:
    import warnings

    from PIL import ImageFile

    path = tmp_path / "bomb.jpg"
    _jpeg_claiming(path, 12000, 12000)
    assert path.stat().st_size < 60_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            assert im.size == (12000, 12000)

    def no_decoding(self):
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's own bomb warning would be a second stderr line
        _assert_refused(path, "12000x12000", "pixels", "--max-pixels")


def test_pixel_cap_is_a_module_setting_and_a_context(tmp_path: Path, monkeypatch) -> None:
    from rsedge.runtime import images

    path = tmp_path / "small.png"
    Image.fromarray(_rgb_array(40, 40)).save(path)  # 1,600 pixels
    assert images.MAX_PIXELS == 50_000_000
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    _assert_refused(path, "40x40", "--max-pixels")
    with images.pixel_limit(2000):
        assert load_image(path).size == (40, 40)
    assert images.MAX_PIXELS == 1000  # restored
    pillow = Image.MAX_IMAGE_PIXELS
    with images.pixel_limit(400_000_000):  # above Pillow's own bomb limit: Pillow must not refuse first
        assert Image.MAX_IMAGE_PIXELS is None or Image.MAX_IMAGE_PIXELS >= 400_000_000
    assert pillow == Image.MAX_IMAGE_PIXELS  # restored


def test_pixel_cap_on_the_command_line(tmp_path: Path, tiny_bundle, monkeypatch) -> None:
    from rsedge.runtime import images
    from tests.test_bad_input import assert_one_error_line, run

    path = tmp_path / "small.png"
    Image.fromarray(_rgb_array(40, 40)).save(path)
    args = ("run", tiny_bundle, "--image", path, "--prompt", "[CAP] Describe it.", "--max-new-tokens", "2")
    assert_one_error_line(run(*args, "--max-pixels", "1000"), "small.png", "--max-pixels")
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    assert run(*args, "--max-pixels", "2000").exit_code == 0
    assert images.MAX_PIXELS == 1000
    assert_one_error_line(run(*args, "--max-pixels", "0"), "max-pixels")


@pytest.mark.parametrize(
    "name,pixels,photometric,extra,words",
    [
        ("five_band.tif", np.full((6, 8, 5), 50, np.uint8), 1, (0, 0, 0, 0), ("5-band", "gdal_translate -b")),
        ("rgb_nir.tif", np.full((6, 8, 4), 50, np.uint8), 2, (0,), ("4-band", "gdal_translate -b")),
        ("two_band.tif", np.full((6, 8, 2), 50, np.uint8), 1, (0,), ("2-band", "gdal_translate -b")),
        ("rgb_nir16.tif", np.full((6, 8, 4), 5000, np.uint16), 2, (0,), ("4-band", "-ot byte -scale")),
        ("rgb16.tif", np.full((6, 8, 3), 5000, np.uint16), 2, (), ("16-bit", "-ot byte -scale")),
        ("gray16.tif", np.full((6, 8), 5000, np.uint16), 1, (), ("8-bit", "-ot byte -scale")),
        ("float.tif", np.full((6, 8), 0.5, np.float32), 1, (), ("8-bit", "-ot byte -scale")),
    ],
)
def test_multiband_and_deep_rasters_say_how_to_convert(tmp_path, name, pixels, photometric, extra, words) -> None:
    path = tmp_path / name
    _write_tiff(path, pixels, photometric, extra)
    _assert_refused(path, *words)


def test_cmyk_tiff_is_converted(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.tif"
    Image.new("CMYK", (8, 8), (0, 0, 0, 0)).save(path)
    assert load_image(path).getpixel((4, 4)) == (255, 255, 255)
