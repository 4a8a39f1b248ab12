"""A scene's stitched mask as a georeferenced single-band GeoTIFF: label indices on the scene's grid (its CRS and
transform), nodata 255, the label names in tags, and a colour table so QGIS shows it as classes at once."""

from __future__ import annotations

import json
from pathlib import Path

from rsedge import __version__
from rsedge.errors import OptionError
from rsedge.fsutil import write_file_atomic
from rsedge.geo import rasterio
from rsedge.geo.tiling import MASK_NODATA, SceneAnswer
from rsedge.runtime.outputs import BOX_COLOURS


def mask_geotiff_bytes(answer: SceneAnswer) -> bytes:
    """The GeoTIFF's bytes (for a service's response body)."""
    scene = answer.scene
    if answer.mask is None:
        raise OptionError("the answer has no mask: a mask GeoTIFF needs a [SEG] prompt")
    if not scene.georeferenced:
        raise OptionError(f"{scene.name}: the scene has no CRS, so its mask cannot be georeferenced")
    rio = rasterio()
    profile = {
        "driver": "GTiff",
        "width": scene.width,
        "height": scene.height,
        "count": 1,
        "dtype": "uint8",
        "nodata": MASK_NODATA,
        "crs": scene.crs,
        "transform": scene.transform,
        "compress": "deflate",
    }
    # each label a box colour, as the PNG overlays draw them; "others" dark grey (a GeoTIFF palette has no alpha:
    # GIS software hides the nodata value instead)
    colours = {i: (40, 40, 40, 255) for i in range(256)}
    for i in range(1, len(answer.mask_labels)):
        colours[i] = (*BOX_COLOURS[(i - 1) % len(BOX_COLOURS)], 255)
    with rio.io.MemoryFile() as mem:
        with mem.open(**profile) as dst:
            dst.write(answer.mask, 1)
            dst.write_colormap(1, colours)
            dst.set_band_description(1, "label index; names in the labels tag")
            dst.update_tags(
                labels=json.dumps(answer.mask_labels),
                task=answer.tag or "",
                prompt=answer.prompt,
                expert=str(answer.expert),
                software=f"rsedge {__version__}",
            )
            dst.update_tags(1, **{f"label_{i}": name for i, name in enumerate(answer.mask_labels)})
        return bytes(mem.read())


def write_mask_geotiff(answer: SceneAnswer, path: str | Path, overwrite: bool = False) -> Path:
    """Write the mask GeoTIFF to ``path`` atomically; an existing file is replaced only with ``overwrite``."""
    return write_file_atomic(Path(path), mask_geotiff_bytes(answer), overwrite=overwrite)
