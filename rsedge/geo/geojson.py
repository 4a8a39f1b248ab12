"""A scene's answer as a GeoJSON FeatureCollection that QGIS (GDAL's GeoJSON driver) opens as it is.

RFC 7946 allows one CRS, WGS84 longitude/latitude, and GDAL reads every GeoJSON file as that, so the geometry is
in WGS84: any GIS places it without being told a CRS. The scene's own CRS is kept exactly beside it, in each
feature's properties (``native_crs`` and ``native_wkt``, the polygon in that CRS as WKT), rather than in a second
file: one file cannot lose its twin, and a box re-projected from WGS84 would not be bit-for-bit the one measured.
Rings follow the right-hand rule (exterior counter-clockwise), as RFC 7946 asks.

Features: one per merged box (``kind`` "box", with its task, prompt, expert, tile, score and the tile's answer
text) and one per connected region of each mask label (``kind`` "mask", with its label).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from rsedge import __version__
from rsedge.errors import OptionError
from rsedge.fsutil import write_file_atomic
from rsedge.geo import rasterio
from rsedge.geo.tiling import MASK_NODATA, SceneAnswer

WGS84 = "EPSG:4326"


def _ring_area(ring: list[list[float]]) -> float:
    """Signed area (shoelace): positive when counter-clockwise."""
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in itertools.pairwise(ring))


def _oriented(polygon: dict[str, Any]) -> dict[str, Any]:
    """A Polygon with its exterior ring counter-clockwise and its holes clockwise."""
    rings = []
    for i, ring in enumerate(polygon["coordinates"]):
        ring = [list(map(float, p)) for p in ring]
        ccw = _ring_area(ring) > 0
        rings.append(ring if ccw == (i == 0) else ring[::-1])
    return {"type": "Polygon", "coordinates": rings}


def _wkt(polygon: dict[str, Any]) -> str:
    rings = ", ".join("(" + ", ".join(f"{x!r} {y!r}" for x, y in ring) + ")" for ring in polygon["coordinates"])
    return f"POLYGON ({rings})"


def _feature(answer: SceneAnswer, native: dict[str, Any], properties: dict[str, Any]) -> dict[str, Any]:
    from rasterio.warp import transform_geom

    native = _oriented(native)
    wgs84 = transform_geom(answer.scene.crs, WGS84, native)
    if wgs84["type"] != "Polygon":  # cut at the antimeridian: a box there stays whole, in its native CRS below
        wgs84 = transform_geom(answer.scene.crs, WGS84, native, antimeridian_cutting=False)
    props = {
        **properties,
        "task": answer.tag,
        "prompt": answer.prompt,
        "expert": answer.expert,
        "native_crs": answer.scene.crs.to_string(),
        "native_wkt": _wkt(native),
    }
    return {"type": "Feature", "geometry": _oriented(wgs84), "properties": props}


def feature_collection(answer: SceneAnswer) -> dict[str, Any]:
    """The answer's boxes and mask regions as a GeoJSON FeatureCollection (a dict ready for json.dumps)."""
    scene = answer.scene
    if not scene.georeferenced:
        raise OptionError(f"{scene.name}: the scene has no CRS, so its answer cannot be placed on a map (GeoJSON)")
    rasterio()
    features = []
    for sb in answer.boxes:
        rec = answer.box_record(sb)
        ring = [*rec["map_polygon"], rec["map_polygon"][0]]
        tile = answer.tiles[sb.tile]
        x1, y1, x2, y2 = rec["source_pixel"]
        props = {"kind": "box", "label": None, "tile": sb.tile, "score": rec["score"], "text": tile.text}
        props.update(pixel_x1=x1, pixel_y1=y1, pixel_x2=x2, pixel_y2=y2)
        features.append(_feature(answer, {"type": "Polygon", "coordinates": [ring]}, props))
    if answer.mask is not None:
        from rasterio.features import shapes

        keep = (answer.mask != 0) & (answer.mask != MASK_NODATA)
        if keep.any():
            regions = shapes(answer.mask, mask=keep, connectivity=4, transform=answer.scene.transform)
            for geom, value in regions:
                label = answer.mask_labels[int(value)]
                props = {"kind": "mask", "label": label, "tile": None, "score": None, "text": None}
                features.append(_feature(answer, geom, props))
    return {
        "type": "FeatureCollection",
        "name": Path(scene.name).stem,
        # foreign members (RFC 7946 section 6.1): what was read and how; GIS readers ignore them
        "rsedge": {
            "version": __version__,
            "scene": scene.to_json(),
            "tiling": {"tile": answer.tile_size, "overlap": answer.overlap, "nms_iou": answer.iou},
        },
        "features": features,
    }


def geojson_bytes(answer: SceneAnswer) -> bytes:
    """The FeatureCollection as UTF-8 JSON (for a service's response body)."""
    return (json.dumps(feature_collection(answer), indent=1, default=_plain) + "\n").encode()


def write_geojson(answer: SceneAnswer, path: str | Path, overwrite: bool = False) -> Path:
    """Write the FeatureCollection to ``path`` atomically; an existing file is replaced only with ``overwrite``."""
    return write_file_atomic(Path(path), geojson_bytes(answer), overwrite=overwrite)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
