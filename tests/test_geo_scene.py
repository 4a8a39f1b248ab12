"""Reading rasters as scenes: bands, the percentile stretch (recorded), nodata, ground resolution, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from rsedge.errors import ImageError, OptionError
from rsedge.geo.scene import parse_bands, parse_stretch, read_scene, wants_scene
from tests.geo_scenes import RES, TRANSFORM, rgb_scene, sample_rgb, sixteen_bit_bgrn, write_geotiff


def _stretched(values: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip(np.rint((values.astype(np.float64) - low) * 255.0 / (high - low)), 0, 255).astype(np.uint8)


def test_a_utm_geotiff_reads_as_its_pixels_with_its_grid(tmp_path, samples):
    rgb = sample_rgb(samples)
    scene = read_scene(rgb_scene(tmp_path / "s.tif", rgb))
    assert np.array_equal(scene.rgb, rgb)
    assert scene.crs.to_epsg() == 32633 and scene.transform == TRANSFORM
    assert scene.bands == (1, 2, 3) and scene.stretch == {"method": "none"} and scene.valid.all()
    assert scene.to_map([0, 512], [0, 512]) == [(500000.0, 5000000.0), (500256.0, 4999744.0)]


def test_sixteen_bit_four_bands_chosen_and_stretched(tmp_path, samples):
    rgb = sample_rgb(samples)
    path = sixteen_bit_bgrn(tmp_path / "bgrn.tif", rgb)
    scene = read_scene(path, bands=(3, 2, 1), stretch=(0, 100))
    for c in range(3):  # min-max stretch of 40 * v + 500 is v's own min-max stretch
        lo, hi = int(rgb[..., c].min()), int(rgb[..., c].max())
        assert np.array_equal(scene.rgb[..., c], _stretched(rgb[..., c], lo, hi))
    assert scene.stretch["band_ranges"][0] == [rgb[..., 0].min() * 40.0 + 500, rgb[..., 0].max() * 40.0 + 500]
    # the default is the 2-98 percentile cut, recorded with the values it used
    default = read_scene(path, bands=(3, 2, 1))
    red = rgb[..., 0].astype(np.float64) * 40 + 500
    assert default.stretch["percentiles"] == [2.0, 98.0] and default.dtype == "uint16"
    assert default.stretch["band_ranges"][0] == pytest.approx(list(np.percentile(red, [2, 98])))
    assert np.array_equal(default.rgb[..., 0], _stretched(red, *np.percentile(red, [2, 98])))
    # no --bands on a 4-band raster without colour interpretation: the first three (blue, green, red here)
    assert read_scene(path).bands == (1, 2, 3)


def test_rgb_colour_interpretation_picks_the_bands(tmp_path, samples):
    rgb = sample_rgb(samples)
    path = write_geotiff(
        tmp_path / "bgr.tif",
        np.moveaxis(rgb, -1, 0)[::-1].copy(),
        colorinterp=["blue", "green", "red"],
    )
    scene = read_scene(path)
    assert scene.bands == (3, 2, 1)
    assert np.array_equal(scene.rgb, rgb)


def test_nodata_is_black_and_left_out_of_the_statistics(tmp_path):
    values = np.tile(np.arange(100, dtype=np.uint16) * 10, (100, 1))  # columns 0..990
    values[:, :30] = 65535  # a nodata strip that would drag the 98th percentile to the top if counted
    scene = read_scene(write_geotiff(tmp_path / "nd.tif", values, nodata=65535), stretch=(0, 100))
    assert not scene.valid[:, :30].any() and scene.valid[:, 30:].all()
    assert (scene.rgb[:, :30] == 0).all()
    assert scene.stretch["band_ranges"] == [[300.0, 990.0]]  # min and max of the valid pixels only
    assert scene.rgb[0, 30, 0] == 0 and scene.rgb[0, 99, 0] == 255
    assert scene.to_json()["nodata_pixels"] == 3000


def test_float_nan_is_nodata(tmp_path):
    values = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    values[:8] = np.nan
    scene = read_scene(write_geotiff(tmp_path / "f.tif", values))
    assert not scene.valid[:8].any() and scene.valid[8:].all()
    assert scene.rgb[8:].max() == 255 and scene.stretch["method"] == "percentile"


def test_gsd_resamples_and_keeps_the_footprint(tmp_path, samples):
    rgb = sample_rgb(samples)
    scene = read_scene(rgb_scene(tmp_path / "s.tif", rgb), gsd=2 * RES)
    assert (scene.width, scene.height) == (256, 256) and scene.resolution == (1.0, 1.0)
    assert scene.to_map([256], [256]) == [(500256.0, 4999744.0)]  # the same corner on the ground
    assert scene.to_source_pixels([100], [50]) == [(200.0, 100.0)]
    # averaging 2x2 blocks, as GDAL's average resampling does
    expected = rgb.reshape(256, 2, 256, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(scene.rgb.astype(np.float64) - expected).max() <= 1.0
    assert scene.stretch["resampled"] == {"gsd_m": 1.0, "method": "average"}


def test_gsd_needs_a_projected_crs(tmp_path, samples):
    from rasterio.transform import from_origin

    path = rgb_scene(
        tmp_path / "ll.tif", sample_rgb(samples), crs="EPSG:4326", transform=from_origin(15, 45, 1e-5, 1e-5)
    )
    with pytest.raises(OptionError, match="projected CRS"):
        read_scene(path, gsd=1.0)


def test_a_scene_from_bytes_is_the_scene_from_its_file(tmp_path, samples):
    path = sixteen_bit_bgrn(tmp_path / "bgrn.tif", sample_rgb(samples))
    a, b = read_scene(path, bands=(3, 2, 1)), read_scene(path.read_bytes(), bands=(3, 2, 1), name="upload.tif")
    assert np.array_equal(a.rgb, b.rgb) and a.transform == b.transform and a.crs == b.crs and b.name == "upload.tif"


def test_bad_inputs_are_one_clear_error(tmp_path, samples):
    path = sixteen_bit_bgrn(tmp_path / "bgrn.tif", sample_rgb(samples))
    with pytest.raises(OptionError, match=r"band 5 is out of range; the raster has 4 \(1-4\)"):
        read_scene(path, bands=(5, 2, 1))
    text = tmp_path / "notes.tif"
    text.write_text("not a raster\n")
    with pytest.raises(ImageError, match="not a raster GDAL can read"):
        read_scene(text)
    two = write_geotiff(tmp_path / "two.tif", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(OptionError, match="--bands"):
        read_scene(two)
    empty = write_geotiff(tmp_path / "empty.tif", np.zeros((8, 8), np.uint8), nodata=0)
    with pytest.raises(ImageError, match="nodata"):
        read_scene(empty)
    with pytest.raises(OptionError):
        parse_bands("3,2")
    with pytest.raises(OptionError):
        parse_bands("0,1,2")
    with pytest.raises(OptionError):
        parse_stretch("98,2")
    assert parse_bands("3,2,1") == (3, 2, 1) and parse_stretch("1,99.5") == (1.0, 99.5)


def test_the_pixel_cap_holds_for_scenes(tmp_path, samples):
    from rsedge.runtime.images import pixel_limit

    path = rgb_scene(tmp_path / "s.tif", sample_rgb(samples))
    with pixel_limit(100_000), pytest.raises(ImageError, match="coarser --gsd"):
        read_scene(path)
    with pixel_limit(100_000):
        assert read_scene(path, gsd=1.0).width == 256  # the cap is on what is read: 256 x 256 fits


def test_only_rasters_beyond_pillow_take_the_scene_path(tmp_path, samples):
    png = tmp_path / "a.png"
    Image.fromarray(sample_rgb(samples)).save(png)
    note = tmp_path / "a.txt"
    note.write_text("hello")
    assert not wants_scene(png) and not wants_scene(note) and not wants_scene(tmp_path / "missing.tif")
    assert wants_scene(rgb_scene(tmp_path / "s.tif", sample_rgb(samples)))  # georeferenced
    assert wants_scene(sixteen_bit_bgrn(tmp_path / "bgrn.tif", sample_rgb(samples)))
    # a plain 8-bit RGB TIFF (no CRS, no transform) is a photo: answered whole by the Pillow path, as before
    assert not wants_scene(rgb_scene(tmp_path / "plain.tif", sample_rgb(samples), crs=None))


def test_the_stretch_is_the_same_in_row_blocks(tmp_path):
    rng = np.random.default_rng(3)
    values = rng.integers(0, 60000, (2100, 5), dtype=np.uint16)  # more rows than one block of the stretch
    scene = read_scene(write_geotiff(tmp_path / "tall.tif", values), stretch=(1, 99))
    low, high = np.percentile(values.astype(np.float64), [1, 99])
    assert np.array_equal(scene.rgb[..., 0], _stretched(values, low, high))
