"""GeoTIFF test scenes made with rasterio from the real sample images: a UTM grid (zone 33N, 0.5 m pixels) with
a known origin, so every pixel's map coordinates are known exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

rasterio = __import__("pytest").importorskip("rasterio")
from rasterio.transform import from_origin  # noqa: E402

CRS = "EPSG:32633"
ORIGIN = (500000.0, 5000000.0)  # top-left corner of pixel (0, 0): easting, northing
RES = 0.5
TRANSFORM = from_origin(ORIGIN[0], ORIGIN[1], RES, RES)


def sample_rgb(samples: Path, name: str = "dior_05863.png") -> np.ndarray:
    return np.asarray(Image.open(samples / name).convert("RGB"))


def write_geotiff(
    path: Path,
    bands: np.ndarray,
    crs: str | None = CRS,
    transform=TRANSFORM,
    nodata: float | None = None,
    colorinterp: list[str] | None = None,
) -> Path:
    """Write [B, H, W] (or [H, W]) as a GeoTIFF."""
    bands = bands[None] if bands.ndim == 2 else bands
    profile = {
        "driver": "GTiff",
        "width": bands.shape[2],
        "height": bands.shape[1],
        "count": bands.shape[0],
        "dtype": str(bands.dtype),
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
    }
    if crs is None:
        profile.pop("crs")
        profile.pop("transform")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(bands)
        if colorinterp is not None:
            dst.colorinterp = [getattr(rasterio.enums.ColorInterp, c) for c in colorinterp]
    return path


def rgb_scene(path: Path, rgb: np.ndarray, **kwargs) -> Path:
    """An 8-bit RGB scene of an [H, W, 3] array."""
    return write_geotiff(path, np.moveaxis(rgb, -1, 0), **kwargs)


def sixteen_bit_bgrn(path: Path, rgb: np.ndarray, nir_seed: int = 0) -> Path:
    """A 16-bit 4-band scene in the order blue, green, red, near-infrared (a Sentinel-2/PlanetScope-like stack),
    each visible band ``40 * value + 500`` of the 8-bit sample: stretching with percentiles 0,100 gives back the
    sample's own pixels where each band spans 0-255."""
    visible = np.moveaxis(rgb, -1, 0)[::-1].astype(np.uint16) * 40 + 500
    nir = np.random.default_rng(nir_seed).integers(0, 12000, rgb.shape[:2], dtype=np.uint16)
    return write_geotiff(path, np.concatenate([visible, nir[None]]))
