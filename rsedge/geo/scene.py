"""Read a raster into a :class:`Scene`: three 8-bit bands the model can look at, which pixels hold data, and where
the pixels lie on the map.

- Bands: chosen by number (1-based, as GDAL counts them), else the red/green/blue colour interpretation when the
  raster declares it, else the first three; one band is shown as grey.
- Depth: anything but 8-bit is stretched to 0-255 per band between two percentiles of its valid pixels (2-98 by
  default, QGIS's default cumulative cut), and the values used are recorded, so an answer says what was seen.
- Nodata (the nodata value, an alpha band or an internal mask, NaN) is black and left out of the statistics.
- Ground resolution: ``gsd`` resamples at read time (GDAL's average going down, bilinear going up), and the
  scene's transform is that of the resampled grid.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rsedge.errors import ImageError, OptionError
from rsedge.geo import available, rasterio
from rsedge.runtime import images

DEFAULT_PERCENTILES = (2.0, 98.0)
# Statistics come from at most this many valid pixels per band (a regular subsample): a 100 MP scene's percentiles
# move by well under one grey level, and sorting 100 M values costs seconds.
MAX_STAT_PIXELS = 4_000_000
_ROWS = 1024
# Formats the Pillow path reads as it always has; everything else GDAL opens is a scene.
_PILLOW_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"RIFF")


def apply(t: Any, x: float, y: float) -> tuple[float, float]:
    """An affine transform applied to one point (written out: affine 3 deprecates ``*``, affine 2 lacks ``@``)."""
    return float(t.a * x + t.b * y + t.c), float(t.d * x + t.e * y + t.f)


@dataclass
class Scene:
    """A raster ready for the model: ``rgb`` [H, W, 3] uint8 with nodata black, ``valid`` [H, W] bool.

    ``transform`` maps (col, row) of ``rgb`` to the CRS (an affine.Affine); ``source_transform`` does the same
    for the file's own grid (they differ after a ``gsd`` resample). ``crs`` is a rasterio CRS, None when the file
    has none.
    """

    name: str
    rgb: np.ndarray
    valid: np.ndarray
    transform: Any
    source_transform: Any
    crs: Any
    source_size: tuple[int, int]
    bands: tuple[int, ...]
    dtype: str
    stretch: dict[str, Any] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None

    @property
    def resolution(self) -> tuple[float, float]:
        """Pixel size of ``rgb`` in CRS units (x, y), rotation included."""
        t = self.transform
        return math.hypot(t.a, t.d), math.hypot(t.b, t.e)

    def image(self, col: int = 0, row: int = 0, width: int | None = None, height: int | None = None) -> Image.Image:
        """An RGB PIL image of a window of the scene (the whole scene by default)."""
        width = self.width - col if width is None else width
        height = self.height - row if height is None else height
        return Image.fromarray(np.ascontiguousarray(self.rgb[row : row + height, col : col + width]))

    def to_map(self, xs: Sequence[float], ys: Sequence[float]) -> list[tuple[float, float]]:
        """Pixel coordinates of ``rgb`` (x right, y down, corners at integers) -> CRS coordinates."""
        return [apply(self.transform, x, y) for x, y in zip(xs, ys, strict=True)]

    def to_source_pixels(self, xs: Sequence[float], ys: Sequence[float]) -> list[tuple[float, float]]:
        """Pixel coordinates of ``rgb`` -> pixel coordinates of the file's own grid."""
        inverse = ~self.source_transform
        return [apply(inverse, *apply(self.transform, x, y)) for x, y in zip(xs, ys, strict=True)]

    def to_json(self) -> dict[str, Any]:
        t = self.transform
        return {
            "name": self.name,
            "size": [self.width, self.height],
            "source_size": list(self.source_size),
            "crs": self.crs.to_string() if self.crs is not None else None,
            "transform": [t.a, t.b, t.c, t.d, t.e, t.f],
            "resolution": [round(r, 9) for r in self.resolution],
            "bands": list(self.bands),
            "dtype": self.dtype,
            "stretch": self.stretch,
            "nodata_pixels": int(self.valid.size - np.count_nonzero(self.valid)),
        }


def parse_bands(text: str) -> tuple[int, ...]:
    """``"3,2,1"`` -> (3, 2, 1): one band (shown grey) or three (red, green, blue), numbered from 1."""
    try:
        bands = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise OptionError(f"--bands takes band numbers separated by commas, e.g. 3,2,1; got {text!r}") from None
    if len(bands) not in (1, 3):
        raise OptionError(f"--bands takes 1 band (grey) or 3 (red,green,blue), got {len(bands)}")
    if min(bands) < 1:
        raise OptionError(f"--bands counts from 1, as GDAL does; got {text!r}")
    return bands


def parse_stretch(text: str) -> tuple[float, float]:
    """``"2,98"`` -> (2.0, 98.0): the percentiles mapped to 0 and 255."""
    try:
        low, high = (float(p) for p in text.split(","))
    except ValueError:
        raise OptionError(f"--stretch takes two percentiles LOW,HIGH, e.g. 2,98; got {text!r}") from None
    if not 0 <= low < high <= 100:
        raise OptionError(f"--stretch percentiles must satisfy 0 <= LOW < HIGH <= 100, got {text!r}")
    return low, high


def wants_scene(source: str | Path | bytes) -> bool:
    """Whether a file (or its bytes, e.g. a service's upload) is read as a scene: the geo extra is installed, GDAL
    opens it, and it is georeferenced or a raster Pillow would refuse (more bands, more bits, a format Pillow
    lacks). PNG, JPEG, GIF, BMP, WebP and plain 8-bit RGB or grey TIFFs keep the Pillow path, unchanged."""
    if not available():
        return False
    if isinstance(source, bytes):
        head = source[:8]
    else:
        source = Path(source)
        if not source.is_file():
            return False
        with open(source, "rb") as fh:
            head = fh.read(8)
    if head.startswith(_PILLOW_MAGIC):
        return False
    try:
        with _open(rasterio(), source, "<raster>") as src:
            georeferenced = src.crs is not None or not src.transform.is_identity or bool(src.gcps[0])
            plain = src.driver == "GTiff" and src.count in (1, 3) and set(src.dtypes) == {"uint8"}
            return georeferenced or not plain
    except Exception:  # not a raster GDAL reads: the Pillow path says what is wrong with it
        return False


def raster_size(source: str | Path | bytes, where: str) -> tuple[int, int]:
    """(width, height) from the raster's header, nothing decoded: a service holds a scene to its pixel cap first."""
    with _open(rasterio(), source, where) as src:
        return int(src.width), int(src.height)


def _default_bands(src: Any, where: str) -> tuple[int, ...]:
    interp = [ci.name for ci in src.colorinterp]
    if all(c in interp for c in ("red", "green", "blue")):
        return tuple(interp.index(c) + 1 for c in ("red", "green", "blue"))
    if src.count >= 3:
        return (1, 2, 3)
    if src.count == 1:
        return (1,)
    raise OptionError(f"{where}: {src.count}-band raster; choose the bands to show with --bands (e.g. --bands 1)")


def _working_size(src: Any, gsd: float | None, where: str) -> tuple[int, int]:
    if gsd is None:
        return src.width, src.height
    if gsd <= 0:
        raise OptionError(f"--gsd must be a positive number of metres, got {gsd}")
    if src.crs is None or not src.crs.is_projected:
        crs = src.crs.to_string() if src.crs is not None else "no CRS"
        raise OptionError(f"{where}: --gsd needs a projected CRS in metres or feet; the scene has {crs}")
    _, metres_per_unit = src.crs.linear_units_factor
    xres, yres = src.res
    width = max(round(src.width * xres * metres_per_unit / gsd), images.MIN_SIDE)
    height = max(round(src.height * yres * metres_per_unit / gsd), images.MIN_SIDE)
    return width, height


def _stretch(data: np.ndarray, valid: np.ndarray, percentiles: tuple[float, float] | None) -> tuple[np.ndarray, dict]:
    """[B, H, W] -> [B, H, W] uint8, and the record of what was done."""
    if percentiles is None:  # 8-bit data as it is
        return data.astype(np.uint8), {"method": "none"}
    stride = max(1, int(np.count_nonzero(valid)) // MAX_STAT_PIXELS)
    out = np.zeros(data.shape, np.uint8)
    ranges = []
    for b in range(data.shape[0]):
        values = data[b][valid][::stride].astype(np.float64)
        low, high = (float(v) for v in np.percentile(values, percentiles))
        span = high - low if high > low else 1.0  # a flat band: every valid pixel at the low end
        for r in range(0, data.shape[1], _ROWS):  # in row blocks: a float64 copy of a whole band is 8 bytes/pixel
            rows = slice(r, r + _ROWS)
            scaled = np.where(valid[rows], (data[b, rows].astype(np.float64) - low) * (255.0 / span), 0.0)
            out[b, rows] = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)  # NaN (nodata) was set to 0 above
        ranges.append([low, high])
    record = {"method": "percentile", "percentiles": list(percentiles), "band_ranges": ranges}
    if stride > 1:
        record["statistics_stride"] = stride
    return out, record


@contextmanager
def _open(rio: Any, source: str | Path | bytes, where: str) -> Iterator[Any]:
    with ExitStack() as stack:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # NotGeoreferencedWarning: handled as crs None below
                if isinstance(source, bytes):
                    src = stack.enter_context(stack.enter_context(rio.io.MemoryFile(source)).open())
                else:
                    src = stack.enter_context(rio.open(source))
        except Exception as e:  # RasterioIOError for most; GDAL can raise others on a damaged header
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ImageError(f"{where}: not a raster GDAL can read ({first})") from None
        yield src


def read_scene(
    source: str | Path | bytes,
    bands: Sequence[int] | None = None,
    stretch: tuple[float, float] | None = None,
    gsd: float | None = None,
    name: str | None = None,
) -> Scene:
    """Read a raster file (or its bytes, e.g. an upload) into a :class:`Scene`.

    ``bands``: 1 or 3 band numbers from 1 (default: RGB colour interpretation, else the first three, else grey).
    ``stretch``: percentiles (low, high) mapped to 0 and 255 per band; default (2, 98) for rasters that are not
    8-bit, none for 8-bit ones. ``gsd``: resample to this ground resolution in metres (projected CRS only).
    ``name`` names the scene in errors and outputs (default: the path). The scene's pixel count (after
    resampling) is held to :data:`rsedge.runtime.images.MAX_PIXELS`.
    """
    rio = rasterio()
    where = name or (str(source) if not isinstance(source, bytes) else "<raster bytes>")
    if not isinstance(source, bytes):
        path = Path(source)
        if not path.exists():
            raise ImageError(f"{where}: image file not found")
        if not path.is_file():
            raise ImageError(f"{where}: not a file")
    with _open(rio, source, where) as src:
        chosen = tuple(bands) if bands else _default_bands(src, where)
        if len(chosen) not in (1, 3):
            raise OptionError(f"{where}: give 1 band (grey) or 3 (red, green, blue), got {len(chosen)}")
        for b in chosen:
            if not 1 <= b <= src.count:
                raise OptionError(f"{where}: band {b} is out of range; the raster has {src.count} (1-{src.count})")
        width, height = _working_size(src, gsd, where)
        if width < images.MIN_SIDE or height < images.MIN_SIDE:
            raise ImageError(f"{where}: scene is {width}x{height} pixels; it must be at least 2x2")
        if width * height > images.MAX_PIXELS:
            raise ImageError(
                f"{where}: scene is {width}x{height} pixels ({width * height / 1e6:.1f} MP), more than rsedge's "
                f"limit of {images.MAX_PIXELS / 1e6:g} MP; read it at a coarser --gsd, or raise --max-pixels"
            )
        resampled = (width, height) != (src.width, src.height)
        down = width < src.width
        resampling = rio.enums.Resampling.average if down else rio.enums.Resampling.bilinear
        shape = (len(chosen), height, width)
        try:
            data = src.read(list(chosen), out_shape=shape, resampling=resampling)
            masks = src.read_masks(list(chosen), out_shape=shape, resampling=rio.enums.Resampling.nearest)
        except rio.errors.RasterioError as e:  # a header GDAL opened over pixels cut off or damaged (an upload)
            cause = e.__cause__ or e.__context__ or e
            first = (str(cause).strip().splitlines() or [type(e).__name__])[0]
            raise ImageError(f"{where}: cannot read the raster's pixels; is the file truncated? ({first})") from None
        valid = np.all(masks > 0, axis=0)
        if np.issubdtype(data.dtype, np.floating):
            valid &= np.all(np.isfinite(data), axis=0)
        if not valid.any():
            raise ImageError(f"{where}: every pixel of bands {','.join(map(str, chosen))} is nodata")
        dtype = str(data.dtype)
        if stretch is None and dtype != "uint8":
            stretch = DEFAULT_PERCENTILES
        pixels, record = _stretch(data, valid, stretch)
        source_transform = src.transform
        sx, sy = src.width / width, src.height / height  # the source transform composed with a scale
        t = source_transform
        transform = type(t)(t.a * sx, t.b * sy, t.c, t.d * sx, t.e * sy, t.f)
        crs = src.crs if src.crs else None
        source_size = (src.width, src.height)
    rgb = np.moveaxis(pixels if len(chosen) == 3 else np.repeat(pixels, 3, axis=0), 0, -1)
    rgb[~valid] = 0
    if resampled:
        record = {**record, "resampled": {"gsd_m": gsd, "method": "average" if down else "bilinear"}}
    return Scene(
        name=where,
        rgb=np.ascontiguousarray(rgb),
        valid=valid,
        transform=transform,
        source_transform=source_transform,
        crs=crs,
        source_size=source_size,
        bands=chosen,
        dtype=dtype,
        stretch=record,
    )
