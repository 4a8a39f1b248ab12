"""Write a real sample image as a GeoTIFF scene to try `rsedge run` on (the README's commands use it).

    python scripts/sample_geotiff.py OUT.tif [--image rsedge/data/samples/dior_05863.png] [--sixteen-bit]
        [--epsg 32633] [--origin 500000 5000000] [--gsd 0.5]

The image is placed on a north-up grid: its top-left corner at ``--origin`` (easting, northing in the CRS),
``--gsd`` metres per pixel. ``--sixteen-bit`` writes four 16-bit bands in the order blue, green, red, near-infrared
(each visible band 40 * value + 500; the fourth is noise), as a multispectral scene comes, so it needs
``--bands 3,2,1``. Needs the geo extra (rasterio).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.transform import from_origin

SAMPLE = Path(__file__).resolve().parents[1] / "rsedge" / "data" / "samples" / "dior_05863.png"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--image", type=Path, default=SAMPLE)
    ap.add_argument("--sixteen-bit", action="store_true", help="4 bands, uint16: blue, green, red, NIR")
    ap.add_argument("--epsg", type=int, default=32633, help="CRS (default UTM zone 33N)")
    ap.add_argument("--origin", type=float, nargs=2, default=(500000.0, 5000000.0), metavar=("X", "Y"))
    ap.add_argument("--gsd", type=float, default=0.5, help="metres per pixel")
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} already exists")
    rgb = np.moveaxis(np.asarray(Image.open(args.image).convert("RGB")), -1, 0)
    if args.sixteen_bit:
        visible = rgb[::-1].astype(np.uint16) * 40 + 500
        nir = np.random.default_rng(0).integers(0, 12000, rgb.shape[1:], dtype=np.uint16)
        bands = np.concatenate([visible, nir[None]])
    else:
        bands = rgb
    profile = {
        "driver": "GTiff",
        "width": bands.shape[2],
        "height": bands.shape[1],
        "count": bands.shape[0],
        "dtype": str(bands.dtype),
        "crs": f"EPSG:{args.epsg}",
        "transform": from_origin(*args.origin, args.gsd, args.gsd),
        "compress": "deflate",
    }
    with rasterio.open(args.out, "w", **profile) as dst:
        dst.write(bands)
    print(f"wrote {args.out}: {bands.shape[0]} bands {bands.dtype}, EPSG:{args.epsg}, {args.gsd} m pixels")


if __name__ == "__main__":
    main()
