"""rsedge batch over an archive mixing images and GeoTIFF scenes, with the demo model (it answers with real boxes):
every scene line is answer_scene's answer (boxes in pixels, in the scene's CRS and in WGS84), a truncated GeoTIFF is
an error line, GeoJSON files open in GDAL, a resume skips the scenes done, and the scene options are checked once."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from rsedge.batch.answer import PipelineSpec
from rsedge.batch.items import Item, collect_items
from rsedge.batch.journal import job_header
from rsedge.batch.local import LocalPool, plan_pool
from rsedge.batch.runner import run_batch
from rsedge.batch.scenes import GeoJsonWriter, geojson_name
from rsedge.errors import OptionError, OutputError
from rsedge.runtime.bundle import Bundle
from tests.batch_archive import read_output
from tests.batch_scenes import CLI_OPTIONS, PNGS, SCENES, TRUNCATED, VG, answers_of, make_scene_archive, reference
from tests.geo_scenes import CRS
from tests.test_bad_input import assert_one_error_line, run

pyogrio = pytest.importorskip("pyogrio")
shapely = pytest.importorskip("shapely")


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return make_scene_archive(tmp_path_factory.mktemp("scene-archive"))


def test_scene_lines_are_answer_scenes_answers(demo_bundle, archive, tmp_path):
    items, _ = collect_items(archive, VG.prompt, None)
    assert {it.id: it.kind for it in items} == {
        **dict.fromkeys(PNGS, "image"),
        **dict.fromkeys([*SCENES, TRUNCATED], "scene"),  # the truncated file's header reads as a GeoTIFF's
    }
    out, geo = tmp_path / "out.jsonl", tmp_path / "geojson"
    header = job_header(demo_bundle, Bundle.open(demo_bundle).manifest_bytes, VG)
    assert header["job"]["scene"] == {
        "bands": [3, 2, 1],
        "stretch": None,
        "gsd": None,
        "tile": 256,
        "overlap": 32,
        "iou": None,
    }
    job = dataclasses.replace(VG, scene=dataclasses.replace(VG.scene, geojson=True))  # as --geojson-dir sets it
    assert job_header(demo_bundle, Bundle.open(demo_bundle).manifest_bytes, job) == header  # an output, not the job
    pool = LocalPool(PipelineSpec(str(demo_bundle)), job, plan_pool(1, None, 2, 0, None))
    summary = run_batch(out, header, items, pool, files=GeoJsonWriter(geo))
    assert (summary.answered, summary.errors) == (5, 1)

    _, records = read_output(out)
    got = answers_of(records)
    assert got == reference(demo_bundle, items, VG)
    assert got[TRUNCATED] == ("scene", {"error_type": "ImageError"})
    bad = next(r for r in records if r["id"] == TRUNCATED)
    assert bad["error"].startswith(f"{TRUNCATED}: cannot read the raster's pixels") and "\n" not in bad["error"]

    by_id = {r["id"]: r["answer"] for r in records if r["ok"]}
    sixteen = by_id[SCENES[1]]
    assert sixteen["scene"]["bands"] == [3, 2, 1] and sixteen["scene"]["dtype"] == "uint16"
    assert sixteen["scene"]["stretch"]["percentiles"] == [2.0, 98.0] and sixteen["scene"]["crs"] == CRS
    assert sixteen["tiling"]["tiles"] == 9 and sixteen["tiling"]["tile"] == 256
    for sid in SCENES:
        answer = by_id[sid]
        assert answer["boxes"], f"{sid}: the demo model found no storage tank; the test would prove little"
        assert all(len(b["map_polygon"]) == len(b["lonlat_polygon"]) == 4 for b in answer["boxes"])
        # the GeoJSON beside it: GDAL's driver (as QGIS) reads one WGS84 polygon per box, each the box's map corners
        path = Path(answer["geojson"])
        assert path == geo / Path(sid).with_suffix(".geojson")
        info = pyogrio.read_info(path)
        assert info["features"] == len(answer["boxes"]) and "4326" in info["crs"]
        features = json.loads(path.read_text())["features"]
        for box, feature in zip(answer["boxes"], features, strict=True):
            native = shapely.from_wkt(feature["properties"]["native_wkt"])
            assert native.equals(shapely.Polygon(box["map_polygon"]))
            lonlat = shapely.normalize(shapely.geometry.shape(feature["geometry"]))
            assert lonlat.equals_exact(shapely.normalize(shapely.Polygon(box["lonlat_polygon"])), 1e-9)
    written = sorted(p.relative_to(geo).as_posix() for p in geo.rglob("*") if p.is_file())
    assert written == [Path(s).with_suffix(".geojson").as_posix() for s in SCENES]  # no temporary file left
    assert all("geojson" not in by_id[p] for p in PNGS)

    # a resume: nothing left to answer but the error; --retry-errors retries it and writes no GeoJSON twice
    summary = run_batch(out, header, items, pool, files=GeoJsonWriter(geo))
    assert (summary.skipped, summary.answered) == (5, 0)
    summary = run_batch(out, header, items, pool, retry_errors=True, files=GeoJsonWriter(geo))
    assert (summary.skipped, summary.answered, summary.errors) == (4, 1, 1)


def test_cli_scene_options_and_geojson_refusals(demo_bundle, archive, tmp_path, samples):
    base = ["batch", demo_bundle, "--inputs", archive, "--prompt", VG.prompt, "--max-new-tokens", "24", *CLI_OPTIONS]
    geo = tmp_path / "geo"
    (geo / "scenes").mkdir(parents=True)
    (geo / "scenes/bgr8.geojson").write_text("{}")
    out = tmp_path / "out.jsonl"
    res = run(*base, "--out", out, "--geojson-dir", geo)
    assert_one_error_line(res, "bgr8.geojson already exists", "--force")
    assert not out.exists() and (geo / "scenes/bgr8.geojson").read_text() == "{}"
    res = run(*base, "--out", out, "--geojson-dir", geo, "--force")
    assert res.exit_code == 1, res.output  # 1: the truncated scene is an error line
    assert "5 items: 5 answered (1 errors)" in res.stdout
    _, records = read_output(out)
    assert {r["id"]: r["kind"] for r in records}[SCENES[1]] == "scene"
    assert pyogrio.read_info(geo / "scenes/bgr8.geojson")["features"] >= 1  # replaced with --force
    # bad scene options: one line before any work, nothing written
    for option, value, words in (("--bands", "3,2", "1 band"), ("--iou", "2", "--iou"), ("--tile", "8", "--tile")):
        res = run(*base, option, value, "--out", tmp_path / "o.jsonl")
        assert_one_error_line(res, words)
    # a resume with other bands is another job
    assert_one_error_line(run(*base, "--bands", "1", "--out", out), "holds another job's answers", "bands")
    # scene options over an archive without a scene
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    (pngs / "a.png").write_bytes((samples / "dior_05863.png").read_bytes())
    res = run("batch", demo_bundle, "--inputs", pngs, "--prompt", VG.prompt, "--out", tmp_path / "p", "--gsd", "1")
    assert_one_error_line(res, "--gsd applies to scenes")
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "p").exists()


def test_geojson_names_stay_inside_the_folder(tmp_path):
    assert geojson_name("scenes/a.tif") == "scenes/a.geojson"
    assert geojson_name("/data/scenes/a.tif") == "data/scenes/a.geojson"  # a list file's absolute path
    assert geojson_name("../up/./a.tiff") == "up/a.geojson"
    writer = GeoJsonWriter(tmp_path / "geo")
    scenes = [Item("x/a.tif", "scene", ("x/a.tif",)), Item("x/a.tiff", "scene", ("x/a.tiff",))]
    with pytest.raises(OptionError, match=r"would both write x/a\.geojson"):
        writer.check(scenes)
    writer.check([Item("x/a.png", "image", ("x/a.png",)), scenes[0]])  # images write no GeoJSON
    (tmp_path / "geo").write_text("")
    with pytest.raises(OutputError, match="is a file"):
        writer.check(scenes[:1])
