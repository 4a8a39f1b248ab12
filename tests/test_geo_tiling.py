"""Tiling by construction: a stand-in pipeline that answers by looking (the box of the white pixels in its tile, or
their run-length mask, in the model's own text forms, parsed by the runtime's parsers) shows that boxes land at the
right scene pixels and map coordinates, overlapping tiles' boxes merge, and masks stitch exactly across tiles."""

from __future__ import annotations

import itertools
import json
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from rsedge.errors import OptionError
from rsedge.geo.geojson import feature_collection, write_geojson
from rsedge.geo.mask_tif import write_mask_geotiff
from rsedge.geo.scene import read_scene
from rsedge.geo.tiling import MASK_NODATA, SceneBox, Window, _cores, answer_scene, nms, tile_windows
from rsedge.runtime.outputs import BOX_COLOURS, Box, box_to_0_100, format_box, format_rle, parse_boxes, parse_rle_mask
from rsedge.runtime.pipeline import Answer
from rsedge.runtime.router import task_tag
from tests.geo_scenes import CRS, rgb_scene


class Spotter:
    """The part of Pipeline that answer_scene calls, answering from the pixels: [VG] the box around the white
    pixels as ``[x1, y1, x2, y2]`` on the 0-100 scale, [SEG] their run-length mask at the tile's resolution."""

    def __init__(self) -> None:
        self.bundle = SimpleNamespace(preprocess={"image_size": 128})
        self.seen: list[tuple[int, int]] = []

    def choose_expert(self, prompt: str, expert: int | None = None) -> int:
        return 1 if task_tag(prompt) == "[VG]" else 2

    def generate(
        self, images, prompt, max_new_tokens=256, sampling=None, expert=None, keep_logits=False, cancel=None
    ) -> Answer:
        pixels = np.asarray(images[0])
        self.seen.append(images[0].size)
        white = (pixels > 200).all(axis=-1)
        w, h = images[0].size
        if task_tag(prompt) == "[VG]":
            ys, xs = np.nonzero(white)
            box = Box(xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if xs.size else None
            text = format_box(box_to_0_100(box, w, h)) if box else "There is none."
            return Answer(text, [1, 2], "[VG]", 1, boxes=parse_boxes(text, w, h), image_sizes=[(w, h)])
        text = format_rle(white.astype(np.uint8), ["others", "building"])
        return Answer(text, [1, 2], "[SEG]", 2, mask=parse_rle_mask(text), image_sizes=[(w, h)])


def _grey_scene(width: int, height: int) -> np.ndarray:
    return np.full((height, width, 3), 60, np.uint8)


def test_tiles_cover_the_scene_with_the_overlap_asked():
    windows = tile_windows(400, 300, 128, 32)
    cols, rows = sorted({w.col for w in windows}), sorted({w.row for w in windows})
    assert cols == [0, 96, 192, 272] and rows == [0, 96, 172]
    assert all((w.width, w.height) == (128, 128) for w in windows)
    assert all(b - a <= 128 - 32 for a, b in itertools.pairwise(cols))  # at least the overlap asked
    assert tile_windows(100, 60, 128, 32) == [Window(0, 0, 100, 60)]  # a small scene is one tile, whole
    owned = np.zeros(400, int)
    for (a, b), start in zip(_cores(cols, 128, 400), cols, strict=True):
        assert start <= a < b <= start + 128
        owned[a:b] += 1
    assert (owned == 1).all()  # every pixel stitched from exactly one tile
    with pytest.raises(OptionError, match="overlap"):
        tile_windows(400, 300, 128, 65)
    with pytest.raises(OptionError, match="tile"):
        tile_windows(400, 300, 8, 0)


def test_nms_keeps_the_best_of_overlapping_boxes():
    a = SceneBox(Box(0, 0, 10, 10), tile=0, score=0.5)
    b = SceneBox(Box(1, 1, 11, 11), tile=1, score=0.9)  # IoU with a: 81 / 119 = 0.68
    c = SceneBox(Box(50, 50, 60, 60), tile=1, score=0.1)
    assert nms([a, b, c], 0.5) == [b, c]
    assert nms([a, b, c], 0.7) == [b, a, c]


def test_a_box_seen_by_four_tiles_is_one_box_at_its_map_coordinates(tmp_path):
    pyproj = pytest.importorskip("pyproj")
    shapely = pytest.importorskip("shapely")
    pyogrio = pytest.importorskip("pyogrio")
    rgb = _grey_scene(400, 300)
    rgb[100:120, 100:120] = 255  # in the overlap of the first two tile columns and rows
    scene = read_scene(rgb_scene(tmp_path / "s.tif", rgb))
    pipe = Spotter()
    answer = answer_scene(pipe, scene, "[VG] Where is the tank?", tile=128, overlap=32)
    assert len(answer.tiles) == 12 and answer.boxes_before_nms == 4 and len(answer.boxes) == 1
    box = answer.boxes[0].box
    assert np.allclose(box.to_list(), [100, 100, 120, 120], atol=0.65)  # the 0-100 text rounds to 1.28 px
    record = answer.box_record(answer.boxes[0])
    x1, y1, x2, y2 = record["pixel"]
    assert record["map_polygon"] == [
        [500000 + 0.5 * x1, 5000000 - 0.5 * y1],
        [500000 + 0.5 * x2, 5000000 - 0.5 * y1],
        [500000 + 0.5 * x2, 5000000 - 0.5 * y2],
        [500000 + 0.5 * x1, 5000000 - 0.5 * y2],
    ]
    # the GeoJSON: WGS84 geometry where PROJ puts the native corners; the native polygon kept in properties
    out = write_geojson(answer, tmp_path / "a.geojson")
    feature = json.loads(out.read_text())["features"][0]
    to_wgs84 = pyproj.Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)
    expected = {tuple(np.round(to_wgs84.transform(x, y), 10)) for x, y in record["map_polygon"]}
    ring = feature["geometry"]["coordinates"][0]
    assert {tuple(np.round(p, 10)) for p in ring} == expected
    assert {tuple(np.round(p, 10)) for p in record["lonlat_polygon"]} == expected  # the JSON says the same
    polygon = shapely.geometry.shape(feature["geometry"])
    assert polygon.is_valid and polygon.exterior.is_ccw  # RFC 7946's right-hand rule
    native = shapely.from_wkt(feature["properties"]["native_wkt"])
    assert native.bounds == pytest.approx(
        (500000 + 0.5 * x1, 5000000 - 0.5 * y2, 500000 + 0.5 * x2, 5000000 - 0.5 * y1)
    )
    props = feature["properties"]
    assert (props["kind"], props["task"], props["expert"], props["native_crs"]) == ("box", "[VG]", 1, CRS)
    assert props["tile"] == answer.boxes[0].tile and props["score"] == 1.0
    # GDAL's OGR driver, as QGIS opens it
    info = pyogrio.read_info(out)
    assert info["features"] == 1 and info["geometry_type"] == "Polygon" and "4326" in info["crs"]
    meta, _, geometry, fields = pyogrio.raw.read(out)
    names = list(meta["fields"])
    assert {"kind", "task", "prompt", "expert", "tile", "score", "native_wkt"} <= set(names)
    assert fields[names.index("prompt")][0] == "[VG] Where is the tank?"
    assert shapely.from_wkb(geometry[0]).equals_exact(polygon, 1e-12)


def test_a_mask_stitches_exactly_across_tiles_and_writes_a_georeferenced_tif(tmp_path):
    rasterio = pytest.importorskip("rasterio")
    rgb = _grey_scene(400, 300)
    rgb[20:280, 90:110] = 255  # a road crossing tile seams in both directions
    rgb[150:170, 0:400] = 255
    bands = np.moveaxis(rgb, -1, 0).astype(np.uint16)
    bands[:, :, 260:] = 0  # a nodata strip: the last column of tiles (x 272-400) sees nothing
    from tests.geo_scenes import write_geotiff

    scene = read_scene(write_geotiff(tmp_path / "s.tif", bands, nodata=0), stretch=(0, 100))
    pipe = Spotter()
    answer = answer_scene(pipe, scene, "[SEG] Segment the road.", tile=128, overlap=32)
    assert answer.skipped_tiles == 3 and len(pipe.seen) == 9  # the x=272 column lies wholly in the nodata strip
    truth = np.where((rgb > 200).all(axis=-1), 1, 0).astype(np.uint8)
    truth[:, 260:] = MASK_NODATA
    assert answer.mask_labels == ["others", "building"]
    assert np.array_equal(answer.mask, truth)
    path = write_mask_geotiff(answer, tmp_path / "mask.tif")
    with rasterio.open(path) as src:
        assert src.crs.to_string() == CRS and src.transform == scene.transform
        assert (src.count, src.dtypes[0], src.nodata) == (1, "uint8", MASK_NODATA)
        assert json.loads(src.tags()["labels"]) == ["others", "building"]
        assert src.tags(1)["label_1"] == "building"
        assert np.array_equal(src.read(1), truth)
        assert src.colormap(1)[1][:3] == BOX_COLOURS[0]  # QGIS shows it as classes, in the overlays' colours
    features = feature_collection(answer)["features"]
    assert {f["properties"]["kind"] for f in features} == {"mask"}
    assert {f["properties"]["label"] for f in features} == {"building"}


def test_outputs_refuse_what_they_cannot_place(tmp_path):
    rgb = _grey_scene(100, 80)
    scene = read_scene(rgb_scene(tmp_path / "plain.tif", rgb, crs=None))
    answer = answer_scene(Spotter(), scene, "[VG] Where?", tile=128)
    with pytest.raises(OptionError, match="no CRS"):
        write_geojson(answer, tmp_path / "a.geojson")
    with pytest.raises(OptionError, match=r"\[SEG\]"):
        write_mask_geotiff(answer, tmp_path / "m.tif")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.tif"]


def test_a_cancelled_scene_stops_between_tiles(tmp_path):
    scene = read_scene(rgb_scene(tmp_path / "s.tif", _grey_scene(400, 300)))
    pipe, cancel = Spotter(), threading.Event()
    answer = answer_scene(pipe, scene, "[VG] Where?", tile=128, overlap=32, on_tile=lambda done, total: cancel.set())
    assert len(answer.tiles) == 12 and not answer.cancelled  # not given: every tile runs
    pipe = Spotter()
    cancel.clear()
    answer = answer_scene(
        pipe, scene, "[VG] Where?", tile=128, overlap=32, cancel=cancel, on_tile=lambda d, t: d == 2 and cancel.set()
    )
    assert len(pipe.seen) == 2 and len(answer.tiles) == 2 and answer.cancelled
    assert answer.to_json()["cancelled"] is True and answer.stopped_by == "cancelled"
