"""Images a request carries (data URIs, uploaded bytes, or server-side paths where allowed), checked before
they are decoded: the pixel cap is read from the header, so a small file claiming a huge image costs nothing."""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from rsedge.errors import ImageError
from rsedge.runtime.images import load_image, validate_image

_DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[\w.+-]+)*)(?P<b64>;base64)?,", re.I)


def image_from_bytes(raw: bytes, where: str, max_pixels: int) -> Image.Image:
    """An uploaded or data-URI image, refused in one line when unreadable or over ``max_pixels``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own cap below says it in one line
            img = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError:
        raise ImageError(
            f"{where}: image is too large to open safely; this service's limit is {max_pixels / 1e6:g} MP"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise ImageError(f"{where}: not a readable image (PNG, JPEG, TIFF, ...)") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            f"{where}: image is {width}x{height} pixels ({width * height / 1e6:.1f} MP), more than this service's "
            f"limit of {max_pixels / 1e6:g} MP"
        )
    return validate_image(img, name=where)


def decode_data_uri(uri: str, where: str) -> bytes:
    m = _DATA_URI.match(uri)
    if m is None:
        raise ImageError(f"{where}: not a data URI (expected data:image/png;base64,...)")
    if m.group("mime") and not m.group("mime").lower().startswith("image/"):
        raise ImageError(f"{where}: data URI of type {m.group('mime')}, not an image")
    if not m.group("b64"):
        raise ImageError(f"{where}: the data URI must be base64 (data:image/png;base64,...)")
    try:
        return base64.b64decode(uri[m.end() :], validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{where}: the data URI's base64 payload is malformed") from None


def source_from_url(url: str, where: str, image_root: Path | None) -> bytes | Path:
    """A data URI's bytes, or a path (``file://`` or plain) under ``image_root`` when the service allows paths;
    nothing is decoded yet (the bytes may be an image or a GeoTIFF scene)."""
    if not isinstance(url, str) or not url:
        raise ImageError(f"{where}: expected an image URL (a data URI)")
    if url[:5].lower() == "data:":
        return decode_data_uri(url, where)
    if re.match(r"^[a-z][a-z0-9+.-]*://", url, re.I) and not url.lower().startswith("file://"):
        raise ImageError(f"{where}: this service does not fetch URLs; send the image as a data URI")
    if image_root is None:
        raise ImageError(f"{where}: server-side paths are not allowed here (serve with --image-root); send a data URI")
    path = Path(url[7:] if url.lower().startswith("file://") else url)
    full = (image_root / path).resolve()
    if not full.is_relative_to(image_root.resolve()):
        raise ImageError(f"{where}: {url} is outside the service's image folder")
    return full


def image_from_source(source: bytes | Path, where: str, max_pixels: int) -> Image.Image:
    """The image of :func:`source_from_url`'s answer (or of an upload's bytes), held to ``max_pixels``."""
    if isinstance(source, bytes):
        return image_from_bytes(source, where, max_pixels)
    _check_file_pixels(source, where, max_pixels)
    return load_image(source)


def image_from_url(url: str, where: str, max_pixels: int, image_root: Path | None) -> Image.Image:
    """A data URI, or a path (``file://`` or plain) under ``image_root`` when the service allows paths."""
    return image_from_source(source_from_url(url, where, image_root), where, max_pixels)


def _check_file_pixels(path: Path, where: str, max_pixels: int) -> None:
    """The service's cap, read from a file's header before load_image decodes it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return  # load_image names the problem in its own words
    if width * height > max_pixels:
        raise ImageError(
            f"{where}: image is {width}x{height} pixels, more than this service's limit of {max_pixels / 1e6:g} MP"
        )
