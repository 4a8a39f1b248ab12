"""Georeferenced scenes: read a GeoTIFF (or any raster GDAL reads), answer it tile by tile, and place the answer
on the map (GeoJSON, a label GeoTIFF).

- :mod:`rsedge.geo.scene`: ``read_scene`` -> :class:`~rsedge.geo.scene.Scene` (bands chosen, stretched to 8 bits,
  nodata masked, optionally resampled to a ground resolution).
- :mod:`rsedge.geo.tiling`: ``answer_scene(pipe, scene, prompt)`` -> :class:`~rsedge.geo.tiling.SceneAnswer`
  (tiles with overlap, boxes mapped back and merged by NMS, masks stitched).
- :mod:`rsedge.geo.geojson` and :mod:`rsedge.geo.mask_tif`: the answer as files QGIS opens.

rasterio comes with the optional ``geo`` extra and is imported only here, on first use, so the runtime without
it is unchanged.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from rsedge.errors import OptionError

INSTALL_HINT = "pip install 'rsedge[geo]'"
# Neighbouring tiles share an eighth of a tile (48 pixels of a 384 tile): an object cut by one tile's edge is whole
# in the next one when it is smaller than that.
DEFAULT_OVERLAP_FRACTION = 1 / 8
DEFAULT_IOU = 0.5  # NMS: boxes of two tiles overlapping more than this are one object


def rasterio() -> ModuleType:
    """The rasterio module, or one error line saying how to install it."""
    try:
        return importlib.import_module("rasterio")
    except ImportError:
        raise OptionError(f"georeferenced scenes need rasterio: {INSTALL_HINT}") from None


def available() -> bool:
    """Whether the geo extra is installed (rasterio imports)."""
    try:
        importlib.import_module("rasterio")
    except ImportError:
        return False
    return True
