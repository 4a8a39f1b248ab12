"""Load and check input images: every refusal is an ImageError with one line that names the file.

The model was trained on 8-bit RGB photos. Anything else is either converted without loss of meaning
(grayscale, CMYK, YCbCr, palette without transparency) or refused with a hint, because a silent
conversion would change what the model sees: an alpha channel has no defined background colour,
Pillow quietly drops the low byte of 16-bit RGB and every band after the third of a 4-band raster, so it
would not be the image the user meant. Images are turned upright by their EXIF orientation, so boxes and
overlays are in the frame a viewer shows.

Runtime module: numpy, Pillow and the stdlib only.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import ExifTags, Image, ImageOps, TiffImagePlugin, UnidentifiedImageError

from rsedge.errors import ImageError, OptionError

MIN_SIDE = 2
# rsedge's own cap, checked on the header before decoding: a 59 KB JPEG can claim 12000x12000 and cost
# gigabytes to decode. Pillow's bomb limit (89 MP warning, 179 MP error) is looser; raise this with
# pixel_limit() or `rsedge run --max-pixels`.
MAX_PIXELS = 50_000_000

# Modes that carry an alpha channel (premultiplied ones included).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Modes with more than 8 bits per sample: integer 16/32-bit and float.
_HIGH_DEPTH_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_TIFF_MAGIC = (b"II*\0", b"MM\0*")
_SAMPLES_PER_PIXEL, _BITS_PER_SAMPLE = 277, 258
_DEPTH_HINT = (
    "rsedge takes 8-bit RGB: scale it to 8 bits first, e.g. `gdal_translate -ot Byte -scale in.tif out.png` "
    "or `convert in.tif -depth 8 out.png`"
)
_BANDS_HINT = (
    "rsedge takes 8-bit RGB: pick its red, green and blue bands and scale them to 8 bits, e.g. "
    "`gdal_translate -b 1 -b 2 -b 3 -ot Byte -scale in.tif out.png`; or install the geo extra "
    "(pip install 'rsedge[geo]'), with which `rsedge run --image in.tif --bands 3,2,1` reads the raster itself"
)


@contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Take images of up to ``max_pixels`` pixels for the duration (process-wide, like Pillow's own limit).

    Pillow's bomb limit is raised to match where it is lower, so that it does not refuse (or warn about) an
    image rsedge was told to take; both are restored on exit.
    """
    global MAX_PIXELS
    if max_pixels < 1:
        raise OptionError(f"max-pixels must be at least 1, got {max_pixels}")
    before, pillow = MAX_PIXELS, Image.MAX_IMAGE_PIXELS
    MAX_PIXELS = max_pixels
    if pillow is not None and pillow < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        MAX_PIXELS, Image.MAX_IMAGE_PIXELS = before, pillow


def _describe(img: Image.Image, name: str | None) -> str:
    if name:
        return str(name)
    filename = getattr(img, "filename", "")
    return str(filename) if filename else "<in-memory image>"


def _raw_modes(img: Image.Image) -> list[str]:
    """Raw (on-disk) sample layouts of a not-yet-decoded image; empty once it is loaded."""
    modes: list[str] = []
    for tile in getattr(img, "tile", None) or []:
        args = tile[3] if len(tile) > 3 else None
        if isinstance(args, str):
            modes.append(args)
        elif isinstance(args, tuple) and args and isinstance(args[0], str):
            modes.append(args[0])
    return modes


def _tiff_layout(path: Path) -> tuple[int, int] | None:
    """(samples per pixel, bits per sample) of a TIFF's first image, read from its header; None if no TIFF."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if head[:4] not in _TIFF_MAGIC:
                return None
            ifd = TiffImagePlugin.ImageFileDirectory_v2(head)
            fh.seek(ifd.next)
            ifd.load(fh)
    except Exception:  # a damaged header: the caller reports the file as unreadable
        return None
    samples = ifd.get(_SAMPLES_PER_PIXEL, 1)
    bits = ifd.get(_BITS_PER_SAMPLE, (1,))
    bits = bits[0] if isinstance(bits, tuple) and bits else bits
    return (int(samples), int(bits)) if isinstance(samples, int) and isinstance(bits, int) else None


def _check_bands(img: Image.Image, where: str) -> None:
    # A TIFF's extra bands (RGB + NIR, two-band L + X) open as RGB or L with the rest dropped on decode.
    tags = getattr(img, "tag_v2", None)
    samples = tags.get(_SAMPLES_PER_PIXEL, 1) if tags is not None else 1
    if isinstance(samples, int) and samples > len(img.getbands()):
        raise ImageError(f"{where}: {samples}-band raster; {_BANDS_HINT}")


def _check_depth(img: Image.Image, where: str) -> None:
    if img.mode in _HIGH_DEPTH_MODES:
        raise ImageError(f"{where}: {img.mode} image with more than 8 bits per channel; {_DEPTH_HINT}")
    # Pillow opens 16-bit RGB(A) PNG/TIFF as mode RGB and drops the low byte while decoding, so the
    # only place the depth shows is the raw mode of the pending decode (e.g. "RGB;16B").
    if any(";16" in raw or ";32" in raw for raw in _raw_modes(img)):
        raise ImageError(f"{where}: 16-bit-per-channel {img.mode} image; {_DEPTH_HINT}")


def _check_alpha(img: Image.Image, where: str) -> None:
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        raise ImageError(
            f"{where}: image has an alpha channel ({img.mode}); flatten it onto a background "
            "(e.g. `convert in.png -background white -flatten out.png`) and try again"
        )


def _check_size(img: Image.Image, where: str) -> None:
    width, height = img.size
    if width < MIN_SIDE or height < MIN_SIDE:
        minimum = f"{MIN_SIDE}x{MIN_SIDE}"
        raise ImageError(f"{where}: image is {width}x{height} pixels; it must be at least {minimum}")
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{where}: image is {width}x{height} pixels ({width * height / 1e6:.1f} MP), more than rsedge's limit "
            f"of {MAX_PIXELS / 1e6:g} MP; downscale it, or raise the limit with --max-pixels"
        )


def _upright(img: Image.Image) -> Image.Image:
    """The image turned by its EXIF orientation, as a viewer shows it (the same image when it has none)."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # an unreadable EXIF block: a viewer ignores it too
        return img
    if orientation not in range(2, 9):
        return img
    return ImageOps.exif_transpose(img)


def _checked_rgb(img: Image.Image, where: str) -> Image.Image:
    """Run every check on an image whose header is read, decode it fully, and return it upright, as RGB."""
    _check_size(img, where)  # before load(): the pixel cap must not cost the decode it guards against
    _check_alpha(img, where)
    _check_bands(img, where)
    _check_depth(img, where)  # before load(): the raw-mode clue is gone after decoding
    try:
        # Force a full decode now: Pillow is lazy, and a truncated file would otherwise fail (or,
        # with LOAD_TRUNCATED_IMAGES, turn grey) deep inside preprocessing.
        img.load()
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, zlib/struct errors...
        raise ImageError(f"{where}: image data is corrupt or truncated ({exc})") from exc
    img = _upright(img)
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"{where}: cannot convert colour mode {img.mode} to RGB ({exc})") from exc


def validate_image(img: Image.Image, name: str | None = None) -> Image.Image:
    """Check an already-open PIL image the way load_image checks a file; return it upright, as RGB.

    ``name`` is used in error messages (default: the image's filename, if any). The 16-bit RGB and pixel-cap
    checks only spare the decode while the image is not yet decoded; for a loaded one Pillow has already
    dropped the low byte.
    """
    if not isinstance(img, Image.Image):
        raise ImageError(f"{name or 'image'}: expected a PIL image, got {type(img).__name__}")
    return _checked_rgb(img, _describe(img, name))


def _unreadable(path: Path, exc: Exception) -> ImageError:
    layout = _tiff_layout(path)
    if layout is not None:  # Pillow reads no TIFF of more than 4 bands, nor 4 gray bands
        samples, bits = layout
        hint = _BANDS_HINT if samples > 1 else _DEPTH_HINT
        return ImageError(f"{path}: {samples}-band {bits}-bit raster that Pillow cannot read; {hint}")
    return ImageError(f"{path}: not a readable image file ({exc.__class__.__name__})")


@contextmanager
def opened_image(path: str | Path) -> Iterator[Image.Image]:
    """An image file opened with its header read and nothing decoded; its size is checked (at least 2x2, at most
    MAX_PIXELS) first, so a decompression bomb costs nothing. Readers of masks and sizes use it too."""
    path = Path(path)
    where = str(path)
    if not path.exists():
        raise ImageError(f"{where}: image file not found")
    if not path.is_file():
        raise ImageError(f"{where}: not a file")
    try:
        with warnings.catch_warnings():
            # Pillow warns past 89 MP; rsedge's stricter cap refuses such an image below, in one line. (Should
            # two threads interleave here, the worst outcome is that this one warning stays silenced.)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"{where}: image is too large to open safely ({exc}); rsedge's limit is {MAX_PIXELS / 1e6:g} MP "
            "(--max-pixels)"
        ) from exc
    except UnidentifiedImageError as exc:
        raise _unreadable(path, exc) from exc
    except OSError as exc:
        raise ImageError(f"{where}: not a readable image file ({exc.__class__.__name__})") from exc
    except Exception as exc:  # a damaged header can raise SyntaxError, ValueError, struct.error...
        raise ImageError(f"{where}: not a readable image file ({exc})") from exc
    with opened:
        _check_size(opened, where)
        yield opened


def load_image(path: str | Path) -> Image.Image:
    """Open an image file, check it, decode it fully and return it upright as an RGB PIL image."""
    with opened_image(path) as opened:
        rgb = _checked_rgb(opened, str(path))
        # Detach from the file handle, which the with-block closes.
        return rgb.copy() if rgb is opened else rgb
