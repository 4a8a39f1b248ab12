"""GeoTIFF (and other rasters GDAL reads) through the service.

A request's image is a scene when its bytes say so (a georeferenced raster, or one Pillow cannot read: 16-bit,
multiband), or when the request gives a scene field (``bands``, ``stretch``, ``gsd``, ``tile``, ``overlap``,
``iou``). It is read with the request's bands and stretch before it is queued, answered tile by tile on a worker
by :func:`rsedge.geo.tiling.answer_scene` (which checks the request's cancel event between tiles), and returned
with boxes in scene pixels and on the map, the mask as RLE, PNG or a georeferenced GeoTIFF, and on request the
GeoJSON FeatureCollection and an 8-bit preview PNG of the stretched scene (a browser cannot show a GeoTIFF; a
plain image's request may ask for its preview too, for a TIFF the browser cannot show).

Without the geo extra a GeoTIFF is refused in one line naming it (HTTP 501): read as a plain TIFF it would lose
its map, and a 16-bit or multiband one is not an image Pillow gives the model.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from rsedge.errors import ImageError, OptionError, RsedgeError
from rsedge.geo import DEFAULT_IOU, DEFAULT_OVERLAP_FRACTION, INSTALL_HINT, available

TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic TIFF and BigTIFF, either byte order
# ModelPixelScale, ModelTiepoint, ModelTransformation, GeoKeyDirectory: any one makes a TIFF a GeoTIFF
GEOTIFF_TAGS = (33550, 33922, 34264, 34735)
READING_FIELDS = ("bands", "stretch", "gsd", "tile", "overlap", "iou")
MASK_FORMATS = ("rle", "png", "geotiff")


class GeoUnavailable(RsedgeError):
    """A GeoTIFF scene reached a service without the geo extra (HTTP 501)."""


@dataclass(frozen=True)
class SceneFields:
    """The scene fields of a request, parsed (None: not given)."""

    bands: tuple[int, ...] | None = None
    stretch: tuple[float, float] | None = None
    gsd: float | None = None
    tile: int | None = None
    overlap: int | None = None
    iou: float | None = None
    want_geojson: bool = False
    preview: bool = False

    @property
    def given(self) -> list[str]:
        """The reading fields given: any of them reads the image as a scene, as ``rsedge run``'s options do."""
        return [name for name in READING_FIELDS if getattr(self, name) is not None]


@dataclass
class SceneJob:
    """A scene read and checked, waiting for a worker, and what its answer should carry."""

    scene: Any  # rsedge.geo.scene.Scene
    tile: int
    overlap: int
    iou: float
    want_geojson: bool
    preview: bool


def _numbers(key: str, value: Any, kind: type, count: tuple[int, ...]) -> tuple | None:
    """A list of numbers given as a JSON list or as text "3,2,1" (a form field)."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else value
    try:
        if not isinstance(parts, list | tuple) or any(isinstance(p, bool) for p in parts):
            raise ValueError
        numbers = tuple(kind(p) for p in parts)
    except (TypeError, ValueError):
        raise OptionError(f"{key} must be numbers, as a list or separated by commas, got {value!r}") from None
    if len(numbers) not in count:
        raise OptionError(f"{key} takes {' or '.join(map(str, count))} numbers, got {len(numbers)}")
    return numbers


def _number(key: str, value: Any, kind: type) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise OptionError(f"{key} must be a number, got {value!r}")
    try:
        number = kind(value)
    except ValueError:
        raise OptionError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if kind is int and number != float(value):
        raise OptionError(f"{key} must be an integer, got {value!r}")
    return number


def _flag(key: str, value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):  # a form field
        return value.lower() in ("true", "1")
    if not isinstance(value, bool):
        raise OptionError(f"{key} must be true or false, got {value!r}")
    return value


def scene_fields(body: dict[str, Any]) -> SceneFields:
    """The scene fields of a JSON body or a form (text values), checked before any image is decoded."""
    bands = _numbers("bands", body.get("bands"), int, (1, 3))
    if bands is not None and min(bands) < 1:
        raise OptionError(f"bands count from 1, as GDAL does; got {list(bands)}")
    stretch = _numbers("stretch", body.get("stretch"), float, (2,))
    if stretch is not None and not 0 <= stretch[0] < stretch[1] <= 100:
        raise OptionError(f"stretch percentiles must satisfy 0 <= low < high <= 100, got {list(stretch)}")
    iou = _number("iou", body.get("iou"), float)
    if iou is not None and not 0 <= iou <= 1:
        raise OptionError(f"iou must be between 0 and 1, got {iou}")
    return SceneFields(
        bands=bands,
        stretch=stretch,
        gsd=_number("gsd", body.get("gsd"), float),
        tile=_number("tile", body.get("tile"), int),
        overlap=_number("overlap", body.get("overlap"), int),
        iou=iou,
        want_geojson=_flag("want_geojson", body.get("want_geojson")),
        preview=_flag("preview", body.get("preview")),
    )


def mask_formats(value: Any) -> frozenset[str]:
    """The ``mask`` field (alias ``mask_format``): rle, png, geotiff, a comma list or a list of them; both = rle,png."""
    parts = value.split(",") if isinstance(value, str) else value
    if not isinstance(parts, list | tuple) or not parts or not all(isinstance(p, str) for p in parts):
        raise OptionError(f"mask must be rle, png, geotiff, both or a list of them, got {value!r}")
    out = set()
    for p in (p.strip().lower() for p in parts):
        if p not in (*MASK_FORMATS, "both"):
            raise OptionError(f"mask must be rle, png, geotiff, both or a list of them, got {value!r}")
        out |= {"rle", "png"} if p == "both" else {p}
    return frozenset(out)


def _head(source: bytes | Path) -> bytes:
    if isinstance(source, bytes):
        return source[:8]
    try:
        with open(source, "rb") as fh:
            return fh.read(8)
    except OSError:
        return b""  # the image reader names the problem


def _needs_geo(source: bytes | Path) -> bool:
    """Without rasterio: a TIFF with GeoTIFF tags, or one Pillow cannot open, is a scene this service cannot read."""
    if not _head(source).startswith(TIFF_MAGIC):
        return False
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return any(tag in img.tag_v2 for tag in GEOTIFF_TAGS)
    except Exception:  # 16-bit multiband, BigTIFF, compression Pillow lacks: GDAL's to read
        return True


def is_scene(source: bytes | Path, where: str, fields: SceneFields) -> bool:
    """Whether this image is read as a scene (see the module docstring); a GeoTIFF without the geo extra is
    refused here."""
    if available():
        from rsedge.geo.scene import wants_scene

        return bool(fields.given) or wants_scene(source)
    if fields.given or _needs_geo(source):
        what = f"the {fields.given[0]} field" if fields.given else "a GeoTIFF scene"
        raise GeoUnavailable(f"{where}: {what} needs the geo extra on the service: {INSTALL_HINT}")
    return False


def read_job(
    source: bytes | Path,
    where: str,
    fields: SceneFields,
    formats: frozenset[str],
    prompt: str,
    max_pixels: int,
    model_size: int,
) -> SceneJob:
    """Read the scene and check everything its answer needs (tiling, a CRS for map outputs) before it is queued."""
    from rsedge.geo.scene import raster_size, read_scene
    from rsedge.geo.tiling import tile_windows
    from rsedge.runtime.router import task_tag

    width, height = raster_size(source, where)
    if fields.gsd is None and width * height > max_pixels:
        raise ImageError(
            f"{where}: scene is {width}x{height} pixels ({width * height / 1e6:.1f} MP), more than this service's "
            f"limit of {max_pixels / 1e6:g} MP; send it at a coarser gsd"
        )
    if "geotiff" in formats and task_tag(prompt) != "[SEG]":
        raise OptionError("mask geotiff is a [SEG] answer's mask; the task is not seg")
    scene = read_scene(source, bands=fields.bands, stretch=fields.stretch, gsd=fields.gsd, name=where)
    if scene.width * scene.height > max_pixels:
        raise ImageError(
            f"{where}: scene read at gsd {fields.gsd:g} m is {scene.width}x{scene.height} pixels, more than this "
            f"service's limit of {max_pixels / 1e6:g} MP"
        )
    if not scene.georeferenced:
        for wanted, name in ((fields.want_geojson, "want_geojson"), ("geotiff" in formats, "mask geotiff")):
            if wanted:
                raise OptionError(f"{name}: {where} has no CRS, so its answer cannot be placed on a map")
    tile = fields.tile or model_size
    overlap = fields.overlap if fields.overlap is not None else int(tile * DEFAULT_OVERLAP_FRACTION)
    tile_windows(scene.width, scene.height, tile, overlap)  # refuses a bad tile or overlap in one line
    iou = DEFAULT_IOU if fields.iou is None else fields.iou
    return SceneJob(scene, tile, overlap, iou, fields.want_geojson, fields.preview)


def _png(pixels: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def preview(pixels: np.ndarray) -> dict[str, Any]:
    """An 8-bit RGB [H, W, 3] array as the PNG a browser shows in place of a TIFF it cannot decode."""
    return {"png": _png(pixels), "size": [int(pixels.shape[1]), int(pixels.shape[0])]}


def usage(answer: Any) -> dict[str, int]:
    """Tokens over every tile run, in the OpenAI usage form."""
    prompt = sum(t.prompt_tokens for t in answer.tiles)
    completion = sum(t.tokens for t in answer.tiles)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def answer_json(answer: Any, job: SceneJob, formats: frozenset[str]) -> dict[str, Any]:
    """A scene's answer for a response: ``boxes`` in scene pixels (as an image's are, so a client draws either the
    same way over the preview), ``scene_boxes`` with each box also in source pixels, the scene's CRS and WGS84,
    the mask in the formats asked, and the GeoJSON and preview when asked."""
    from rsedge.geo.tiling import MASK_NODATA
    from rsedge.runtime.outputs import format_rle

    out = answer.to_json()
    records = out.pop("boxes", [])
    out["boxes"] = [r["pixel"] for r in records]
    out["scene_boxes"] = records
    out["stopped_by"] = answer.stopped_by
    out["tokens"] = sum(t.tokens for t in answer.tiles)
    if answer.mask is not None:
        mask = out["mask"]
        mask["grid"] = mask["shape"]
        if "rle" in formats:  # nodata pixels as the background label: RLE text has no "unknown"
            mask["rle"] = format_rle(np.where(answer.mask == MASK_NODATA, 0, answer.mask), answer.mask_labels)
        if "png" in formats:  # white where a label other than the background is, as an image's mask PNG
            on = (answer.mask != 0) & (answer.mask != MASK_NODATA)
            mask["png"] = _png(on.astype(np.uint8) * 255)
        if "geotiff" in formats:
            from rsedge.geo.mask_tif import mask_geotiff_bytes

            mask["geotiff"] = base64.b64encode(mask_geotiff_bytes(answer)).decode("ascii")
    else:
        out["mask"] = None
    if job.want_geojson:
        from rsedge.geo.geojson import geojson_bytes

        out["geojson"] = json.loads(geojson_bytes(answer))
    if job.preview:  # a list, as for images (one per image of a pair)
        out["preview"] = [preview(answer.scene.rgb)]
    return out
