"""Load and check input images: every refusal is an ImageError with one line that names the file.

The model was trained on 8-bit RGB photos. Anything else is either converted without loss of meaning
(grayscale, CMYK, YCbCr, palette without transparency) or refused with a hint, because a silent
conversion would change what the model sees: an alpha channel has no defined background colour, and
Pillow quietly drops the low byte of 16-bit RGB, so it would not be the image the user meant.

Runtime module: numpy, Pillow and the stdlib only.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from rsedge.errors import ImageError

MIN_SIDE = 2

# Modes that carry an alpha channel (premultiplied ones included).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Modes with more than 8 bits per sample: integer 16/32-bit and float.
_HIGH_DEPTH_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


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


def _check_depth(img: Image.Image, where: str) -> None:
    hint = "convert it to 8-bit RGB first (e.g. `convert in.tif -depth 8 out.png`)"
    if img.mode in _HIGH_DEPTH_MODES:
        raise ImageError(f"{where}: {img.mode} image with more than 8 bits per channel; {hint}")
    # Pillow opens 16-bit RGB(A) PNG/TIFF as mode RGB and drops the low byte while decoding, so the
    # only place the depth shows is the raw mode of the pending decode (e.g. "RGB;16B").
    if any(";16" in raw or ";32" in raw for raw in _raw_modes(img)):
        raise ImageError(f"{where}: 16-bit-per-channel {img.mode} image; {hint}")


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


def _checked_rgb(img: Image.Image, where: str) -> Image.Image:
    """Run every check on an image whose header is read, decode it fully, and return it as RGB."""
    _check_size(img, where)
    _check_alpha(img, where)
    _check_depth(img, where)  # before load(): the raw-mode clue is gone after decoding
    try:
        # Force a full decode now: Pillow is lazy, and a truncated file would otherwise fail (or,
        # with LOAD_TRUNCATED_IMAGES, turn grey) deep inside preprocessing.
        img.load()
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, zlib/struct errors...
        raise ImageError(f"{where}: image data is corrupt or truncated ({exc})") from exc
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"{where}: cannot convert colour mode {img.mode} to RGB ({exc})") from exc


def validate_image(img: Image.Image, name: str | None = None) -> Image.Image:
    """Check an already-open PIL image the way load_image checks a file; return it as RGB.

    ``name`` is used in error messages (default: the image's filename, if any). The 16-bit RGB check
    only works while the image is not yet decoded; for a loaded one Pillow has already dropped
    the low byte.
    """
    if not isinstance(img, Image.Image):
        raise ImageError(f"{name or 'image'}: expected a PIL image, got {type(img).__name__}")
    return _checked_rgb(img, _describe(img, name))


def load_image(path: str | Path) -> Image.Image:
    """Open an image file, check it, decode it fully and return an RGB PIL image."""
    path = Path(path)
    where = str(path)
    if not path.exists():
        raise ImageError(f"{where}: image file not found")
    if not path.is_file():
        raise ImageError(f"{where}: not a file")
    try:
        opened = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{where}: image is too large to open safely ({exc})") from exc
    except OSError as exc:  # UnidentifiedImageError is an OSError
        raise ImageError(f"{where}: not a readable image file ({exc.__class__.__name__})") from exc
    except Exception as exc:  # a damaged header can raise SyntaxError, ValueError, struct.error...
        raise ImageError(f"{where}: not a readable image file ({exc})") from exc
    with opened:
        rgb = _checked_rgb(opened, where)
        # Detach from the file handle, which the with-block closes.
        return rgb.copy() if rgb is opened else rgb
