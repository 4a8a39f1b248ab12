"""`rsedge run` on GeoTIFF scenes with the real demo bundle: a [VG] box lands at its map coordinates, a 16-bit
4-band scene answers as its stretched pixels do, a scene larger than a tile is tiled and merged, outputs open in GDAL,
and bad inputs get one error line and write nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsedge.runtime.outputs import parse_boxes
from tests.geo_scenes import CRS, rgb_scene, sample_rgb, sixteen_bit_bgrn
from tests.test_bad_input import assert_one_error_line, run

pyproj = pytest.importorskip("pyproj")
shapely = pytest.importorskip("shapely")
pyogrio = pytest.importorskip("pyogrio")

VG = "[VG] Where is the storage tank?"


@pytest.fixture
def scene(tmp_path, samples) -> Path:
    return rgb_scene(tmp_path / "scene.tif", sample_rgb(samples))


def _json(res) -> dict:
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def _to_map(x: float, y: float) -> tuple[float, float]:
    return 500000 + 0.5 * x, 5000000 - 0.5 * y


def test_a_vg_box_lands_at_its_map_coordinates(demo_bundle, scene, samples, tmp_path):
    png = run("run", demo_bundle, "--image", samples / "dior_05863.png", "--prompt", VG, "--json")
    out = tmp_path / "answer.geojson"
    geo = _json(run("run", demo_bundle, "--image", scene, "--prompt", VG, "--tile", "512", "--geojson", out, "--json"))
    # one tile, the whole scene: the model saw the PNG's pixels, so it answers as for the PNG
    assert geo["tiles"][0]["text"] == _json(png)["text"] and geo["scene"]["crs"] == CRS
    assert [b["pixel"] for b in geo["boxes"]] == [pytest.approx(b) for b in _json(png)["boxes"]]
    assert geo["geojson"] == str(out)
    collection = json.loads(out.read_text())
    assert len(collection["features"]) == len(geo["boxes"]) >= 1
    to_wgs84 = pyproj.Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)
    for box, feature in zip(geo["boxes"], collection["features"], strict=True):
        x1, y1, x2, y2 = box["pixel"]
        (e1, n1), (e2, n2) = _to_map(x1, y1), _to_map(x2, y2)
        native = shapely.from_wkt(feature["properties"]["native_wkt"])
        assert native.bounds == pytest.approx((e1, n2, e2, n1), abs=1e-6)
        lonlat = shapely.geometry.shape(feature["geometry"])
        corners = [to_wgs84.transform(e, n) for e, n in native.exterior.coords]
        assert lonlat.equals_exact(shapely.Polygon(corners), 1e-9)
        assert feature["properties"]["task"] == "[VG]" and feature["properties"]["prompt"] == VG
        assert 0 < feature["properties"]["score"] <= 1
    info = pyogrio.read_info(out)  # GDAL's GeoJSON driver, as QGIS opens it
    assert info["features"] == len(geo["boxes"]) and "4326" in info["crs"]


def test_a_sixteen_bit_four_band_scene_answers_as_its_stretched_pixels(demo_bundle, samples, tmp_path):
    rgb = sample_rgb(samples)
    path = sixteen_bit_bgrn(tmp_path / "bgrn.tif", rgb)
    args = ("--prompt", VG, "--tile", "512", "--json")
    geo = _json(run("run", demo_bundle, "--image", path, "--bands", "3,2,1", "--stretch", "0,100", *args))
    assert geo["scene"]["bands"] == [3, 2, 1] and geo["scene"]["dtype"] == "uint16"
    assert geo["scene"]["stretch"]["method"] == "percentile" and geo["scene"]["stretch"]["percentiles"] == [0, 100]
    lo, hi = rgb.reshape(-1, 3).min(0).astype(float), rgb.reshape(-1, 3).max(0).astype(float)
    stretched = np.clip(np.rint((rgb - lo) * 255.0 / (hi - lo)), 0, 255).astype(np.uint8)
    Image.fromarray(stretched).save(tmp_path / "stretched.png")
    png = _json(run("run", demo_bundle, "--image", tmp_path / "stretched.png", "--prompt", VG, "--json"))
    assert geo["tiles"][0]["text"] == png["text"]
    # the default stretch is recorded too
    default = _json(run("run", demo_bundle, "--image", path, "--bands", "3,2,1", *args))
    assert default["scene"]["stretch"]["percentiles"] == [2.0, 98.0]


def test_a_scene_larger_than_a_tile_is_tiled_and_merged(demo_bundle, scene, tmp_path):
    out = tmp_path / "tiles.geojson"
    geo = _json(run("run", demo_bundle, "--image", scene, "--prompt", VG, "--geojson", out, "--json"))
    tiling = geo["tiling"]
    assert (tiling["tile"], tiling["overlap"], tiling["tiles"]) == (128, 16, 25)  # the bundle's input size
    assert tiling["boxes_before_nms"] >= len(geo["boxes"]) >= 1
    for box in geo["boxes"]:  # each merged box is its tile's own answer moved by the tile's offset
        tile = geo["tiles"][box["tile"]]
        col, row, w, h = tile["window"]
        own = [[b.x1 + col, b.y1 + row, b.x2 + col, b.y2 + row] for b in parse_boxes(tile["text"], w, h)]
        assert any(np.allclose(box["pixel"], o, atol=1e-3) for o in own)
        x1, y1, x2, y2 = box["pixel"]
        assert box["map_polygon"][0] == pytest.approx(list(_to_map(x1, y1)))
        assert box["map_polygon"][2] == pytest.approx(list(_to_map(x2, y2)))
    kept = np.array([b["pixel"] for b in geo["boxes"]])
    for i in range(len(kept)):  # no two kept boxes overlap beyond the NMS threshold
        for j in range(i + 1, len(kept)):
            ix = max(0, min(kept[i, 2], kept[j, 2]) - max(kept[i, 0], kept[j, 0]))
            iy = max(0, min(kept[i, 3], kept[j, 3]) - max(kept[i, 1], kept[j, 1]))
            area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
            assert ix * iy / (area(kept[i]) + area(kept[j]) - ix * iy) <= 0.5
    assert pyogrio.read_info(out)["features"] == len(geo["boxes"])
    # --gsd: read at 1 m, boxes also given in the file's own pixels
    coarse = _json(run("run", demo_bundle, "--image", scene, "--prompt", VG, "--gsd", "1", "--json"))
    assert coarse["scene"]["size"] == [256, 256] and coarse["tiling"]["tiles"] == 9
    for box in coarse["boxes"]:
        assert box["source_pixel"] == pytest.approx([2 * v for v in box["pixel"]], abs=1e-3)


def test_a_seg_mask_geotiff_has_the_scene_grid(demo_bundle, scene, tmp_path):
    import rasterio

    out = tmp_path / "mask.tif"
    prompt = "[SEG] Please segment the road area."
    geo = _json(run("run", demo_bundle, "--image", scene, "--prompt", prompt, "--mask-tif", out, "--json"))
    assert geo["mask_tif"] == str(out)
    with rasterio.open(out) as src, rasterio.open(scene) as original:
        assert src.crs == original.crs and src.transform == original.transform
        assert (src.width, src.height, src.count, src.nodata) == (512, 512, 1, 255)
        assert json.loads(src.tags()["labels"]) == geo["mask"]["labels"]
        counts = np.bincount(src.read(1).ravel(), minlength=256)
    assert {name: int(counts[i]) for i, name in enumerate(geo["mask"]["labels"])} == geo["mask"]["pixels"]


def _bad_cases(tmp_path: Path, samples: Path) -> dict[str, tuple[list, tuple[str, ...]]]:
    rgb = sample_rgb(samples)
    four = sixteen_bit_bgrn(tmp_path / "bgrn.tif", rgb)
    plain = rgb_scene(tmp_path / "plain.tif", rgb[:64, :64], crs=None)
    notes = tmp_path / "notes.tif"
    notes.write_text("field notes, not a raster\n")
    lonlat = rgb_scene(tmp_path / "ll.tif", rgb[:64, :64], crs="EPSG:4326")
    taken = tmp_path / "taken.geojson"
    taken.write_text("{}")
    out = tmp_path / "out.geojson"
    return {
        "band out of range": (["--image", four, "--bands", "5,2,1"], ("band 5 is out of range", "4 (1-4)")),
        "non-raster file": (["--image", notes, "--geojson", out], ("notes.tif", "not a raster GDAL can read")),
        "no CRS for --geojson": (["--image", plain, "--geojson", out], ("--geojson", "no CRS")),
        "existing output": (["--image", four, "--geojson", taken], ("taken.geojson already exists", "--force")),
        "mask of a [VG] answer": (["--image", four, "--mask-tif", tmp_path / "m.tif"], ("[SEG]",)),
        "gsd on degrees": (["--image", lonlat, "--gsd", "1"], ("projected CRS",)),
        "tile too small": (["--image", four, "--tile", "8"], ("--tile",)),
        "two scenes": (["--image", four, "--image", four, "--bands", "3,2,1"], ("one scene",)),
    }


BAD = [
    "band out of range",
    "non-raster file",
    "no CRS for --geojson",
    "existing output",
    "mask of a [VG] answer",
    "gsd on degrees",
    "tile too small",
    "two scenes",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_error_line_and_writes_nothing(case, demo_bundle, tmp_path, samples):
    args, needles = _bad_cases(tmp_path, samples)[case]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert_one_error_line(run("run", demo_bundle, "--prompt", VG, *args), *needles)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_force_replaces_an_existing_output(demo_bundle, scene, tmp_path):
    out = tmp_path / "a.geojson"
    out.write_text("{}")
    _json(
        run(
            "run", demo_bundle, "--image", scene, "--prompt", VG, "--tile", "512", "--geojson", out, "--force", "--json"
        )
    )
    assert json.loads(out.read_text())["type"] == "FeatureCollection"


BLOCK = (
    "import importlib.abc, sys\n"
    "class B(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in {blocked!r}: raise ImportError(name)\n"
    "sys.meta_path.insert(0, B())\n"
    "from rsedge.cli import main\n"
    "main()\n"
)


def _blocked(blocked: tuple[str, ...], *args) -> subprocess.CompletedProcess:
    code = BLOCK.format(blocked=blocked)
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_scenes_run_without_torch(demo_bundle, scene, tmp_path):
    out = tmp_path / "a.geojson"
    res = _blocked(
        ("torch", "transformers", "safetensors", "onnx", "optimum"),
        "run",
        demo_bundle,
        "--image",
        scene,
        "--prompt",
        VG,
        "--geojson",
        out,
        "--json",
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["tiling"]["tiles"] == 25 and out.is_file()


def test_without_the_geo_extra_the_error_says_how_to_get_it(tiny_bundle, samples, tmp_path):
    four = sixteen_bit_bgrn(tmp_path / "bgrn.tif", sample_rgb(samples))
    res = _blocked(("rasterio",), "run", tiny_bundle, "--image", four, "--prompt", VG, "--bands", "3,2,1")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "--bands" in res.stderr and "pip install 'rsedge[geo]'" in res.stderr
    # no option: the Pillow path refuses the 4-band raster, and its hint names the geo extra
    res = _blocked(("rasterio",), "run", tiny_bundle, "--image", four, "--prompt", VG)
    assert res.returncode == 2 and "4-band" in res.stderr and "rsedge[geo]" in res.stderr
