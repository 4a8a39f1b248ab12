"""GeoTIFF scenes through rsedge serve: the service answers a scene (data URI, upload, chat image) exactly as
answer_scene does, with boxes in scene pixels and on the map, the GeoJSON (read back with OGR), the mask as a
GeoTIFF on the scene's grid and the 8-bit preview; a deadline or a client that leaves stops a scene between tiles;
what cannot be read or placed is one 4xx line, and a service without rasterio (blocked in a subprocess) names the
geo extra."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from rsedge.geo.scene import read_scene
from rsedge.geo.tiling import answer_scene
from rsedge.runtime.pipeline import Pipeline
from rsedge.serve.app import create_app
from rsedge.serve.config import ServeConfig
from rsedge.serve.models import ModelSet
from tests.geo_scenes import CRS, ORIGIN, RES, rgb_scene, sample_rgb, sixteen_bit_bgrn, write_geotiff
from tests.serve_helpers import IMAGE, LiveServer, data_uri, metric, url_body

rasterio = pytest.importorskip("rasterio")
pyogrio = pytest.importorskip("pyogrio")
VG = "[VG] Where is the storage tank?"
SEG = "[SEG] Please segment the road area."
TILING = {"tile": 320, "overlap": 64}  # a 512 x 512 scene in 2 x 2 tiles


@pytest.fixture(scope="module")
def models(demo_bundle) -> ModelSet:
    return ModelSet.load([demo_bundle])


@pytest.fixture(scope="module")
def pipe(demo_bundle) -> Pipeline:
    return Pipeline.load(demo_bundle)


@pytest.fixture(scope="module")
def scene_tif(tmp_path_factory, samples):
    return rgb_scene(tmp_path_factory.mktemp("scene") / "scene.tif", sample_rgb(samples))


def client(models: ModelSet, **cfg) -> TestClient:
    return TestClient(create_app(models, ServeConfig(**cfg)))


def tif_uri(path) -> str:
    return "data:image/tiff;base64," + base64.b64encode(path.read_bytes()).decode()


def png(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def error(r) -> str:
    message = r.json()["error"]["message"]
    assert "\n" not in message
    return message


def test_a_geotiff_is_answered_as_answer_scene_answers_it(models, pipe, scene_tif, samples, tmp_path):
    want = answer_scene(pipe, read_scene(scene_tif), VG, **TILING).to_json()
    assert want["boxes"], "the demo model finds the storage tank"
    body = {"task": "vg", "question": VG[5:], "images": [tif_uri(scene_tif)], "want_geojson": True, "preview": True}
    with client(models) as c:
        r = c.post("/v1/rs/answer", json={**body, **TILING})
        metrics = c.get("/metrics").text
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["text"] == want["text"] and out["tiling"] == want["tiling"]
    assert out["scene"] == {**want["scene"], "name": "image 1"}  # a data URI has no file name
    assert out["scene_boxes"] == want["boxes"]
    assert out["boxes"] == [b["pixel"] for b in want["boxes"]]
    for box in out["scene_boxes"]:  # UTM 33N, 0.5 m pixels from a known corner: every map coordinate is known
        x1, y1, x2, y2 = box["pixel"]
        corners = [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
        want_map = [[ORIGIN[0] + RES * x, ORIGIN[1] - RES * y] for x, y in corners]
        np.testing.assert_allclose(box["map_polygon"], want_map, atol=1e-3)
        lon, lat = box["lonlat_polygon"][0]
        assert 14.99 < lon < 15.01 and 45.1 < lat < 45.2  # 500 km E, 5000 km N in zone 33: near 15 E, 45.1 N
    assert out["usage"]["completion_tokens"] == sum(t["tokens"] for t in want["tiles"]) > 0
    assert metric(metrics, "rsedge_scene_tiles_total", model="demo", task="[VG]", status="answered") == 4
    # the preview is the scene as the model saw it (8-bit, stretched), at the scene's size
    assert np.array_equal(png(out["preview"][0]["png"]), sample_rgb(samples))
    # the GeoJSON opens with GDAL's OGR driver, one WGS84 polygon per box
    path = tmp_path / "answer.geojson"
    path.write_text(json.dumps(out["geojson"]))
    info = pyogrio.read_info(path)
    assert info["features"] == len(want["boxes"]) and info["geometry_type"] == "Polygon"
    assert "4326" in info["crs"]
    fields = pyogrio.raw.read(path)[3]
    assert list(fields[list(info["fields"]).index("native_crs")]) == [CRS] * len(want["boxes"])


def test_a_16_bit_four_band_upload(models, pipe, samples, tmp_path):
    four = sixteen_bit_bgrn(tmp_path / "bgrn.tif", sample_rgb(samples))
    scene = read_scene(four, bands=(3, 2, 1), stretch=(0.0, 100.0))
    want = answer_scene(pipe, scene, VG, **TILING).to_json()
    form = {"task": "vg", "question": VG[5:], "bands": "3,2,1", "stretch": "0,100", "tile": "320", "overlap": "64"}
    with client(models) as c:
        r = c.post("/v1/rs/answer", data=form, files={"image": ("bgrn.tif", four.read_bytes(), "image/tiff")})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["scene"]["dtype"] == "uint16" and out["scene"]["bands"] == [3, 2, 1]
    assert out["scene"]["stretch"] == want["scene"]["stretch"] and out["scene_boxes"] == want.get("boxes", [])
    assert out["text"] == want["text"]


def test_a_chat_completion_with_a_geotiff(models, pipe, scene_tif):
    want = answer_scene(pipe, read_scene(scene_tif), VG)  # the bundle's own tile size: 128 pixels
    with client(models) as c:
        r = c.post("/v1/chat/completions", json=url_body(VG, tif_uri(scene_tif)))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["message"]["content"] == want.text
    assert out["rsedge"]["scene_boxes"] == want.to_json()["boxes"]
    assert out["rsedge"]["tiling"]["tiles"] == 25 and out["choices"][0]["finish_reason"] == "stop"


def test_a_streamed_chat_completion_with_a_geotiff(models, pipe, scene_tif):
    want = answer_scene(pipe, read_scene(scene_tif), VG, **TILING)
    with client(models) as c:
        r = c.post("/v1/chat/completions", json=url_body(VG, tif_uri(scene_tif), stream=True, **TILING))
    assert r.status_code == 200, r.text
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == want.text
    assert chunks[-1]["rsedge"]["scene_boxes"] == want.to_json()["boxes"]
    assert r.text.rstrip().endswith("data: [DONE]")


def test_a_mask_as_a_georeferenced_geotiff(models, pipe, scene_tif):
    want = answer_scene(pipe, read_scene(scene_tif), SEG, **TILING)
    assert want.mask is not None
    body = {"task": "seg", "question": SEG[6:], "images": [tif_uri(scene_tif)], "mask": ["png", "geotiff", "rle"]}
    with client(models) as c:
        r = c.post("/v1/rs/answer", json={**body, **TILING})
    assert r.status_code == 200, r.text
    mask = r.json()["mask"]
    assert mask["labels"] == want.mask_labels and mask["grid"] == [512, 512]
    with rasterio.io.MemoryFile(base64.b64decode(mask["geotiff"])) as mem, mem.open() as src:
        with rasterio.open(scene_tif) as original:
            assert src.crs == original.crs and src.transform == original.transform
        assert np.array_equal(src.read(1), want.mask)
    labelled = (want.mask != 0) & (want.mask != 255)
    assert np.array_equal(png(mask["png"]) > 0, labelled)
    assert mask["rle"].count("\n") == 511  # one run-length line per scene row


@pytest.fixture
def slow_tiles(models, monkeypatch):
    """Each tile's generate call takes at least 0.3 s, however fast the machine: 16 tiles outlast the waits below."""
    pipe = models.default.pipe
    generate = pipe.generate

    def slow(*args, **kwargs):
        time.sleep(0.3)
        return generate(*args, **kwargs)

    monkeypatch.setattr(pipe, "generate", slow)


def test_a_deadline_stops_a_scene_between_tiles(models, scene_tif, slow_tiles):
    tiles = 16  # tile 128, no overlap: 4 x 4
    body = {"task": "vg", "question": VG[5:], "images": [tif_uri(scene_tif)], "tile": 128, "overlap": 0}
    with client(models, deadline_s=2) as c:
        r = c.post("/v1/rs/answer", json=body)
        assert r.status_code == 504 and "did not finish within the service's deadline of 2 s" in error(r)
        c.app.state.pool.shutdown()  # waits for the worker: it must stop at the next tile, not after the last
        text = c.get("/metrics").text
    answered = metric(text, "rsedge_scene_tiles_total", model="demo", task="[VG]", status="answered")
    assert 1 <= answered < tiles


def test_a_client_that_leaves_stops_the_scene_between_tiles(models, scene_tif, slow_tiles):
    body = {"task": "vg", "question": VG[5:], "images": [tif_uri(scene_tif)], "tile": 128, "overlap": 0}
    app = create_app(models, ServeConfig())
    with LiveServer(app) as srv:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(f"{srv.url}/v1/rs/answer", json=body, timeout=httpx.Timeout(60, read=1.5))
        pool = app.state.pool
        deadline = time.monotonic() + 30
        while (pool.running or pool.waiting) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool.running == 0 and pool.waiting == 0
        text = httpx.get(f"{srv.url}/metrics").text
    assert metric(text, "rsedge_scene_tiles_total", model="demo", task="[VG]", status="answered") < 16
    assert metric(text, "rsedge_requests_total", endpoint="/v1/rs/answer", status="499") == 1


def test_refusals_are_one_line(models, scene_tif, samples, tmp_path):
    raw = scene_tif.read_bytes()
    half = tmp_path / "half.tif"
    half.write_bytes(raw[: len(raw) // 2])  # a header GDAL opens, pixels cut off
    plain = rgb_scene(tmp_path / "plain.tif", sample_rgb(samples)[:64, :64], crs=None)
    no_crs = write_geotiff(tmp_path / "no_crs.tif", np.full((3, 64, 64), 900, np.uint16), crs=None)
    vg = {"task": "vg", "question": "Where is the storage tank?"}
    cases = {
        "garbage": (
            {**vg, "images": ["data:image/tiff;base64," + base64.b64encode(b"II*\0" + b"x" * 64).decode()]},
            400,
            "not a readable image",
        ),
        "truncated": ({**vg, "images": [tif_uri(half)]}, 400, "image 1: cannot read the raster's pixels"),
        "geojson of a plain TIFF": ({**vg, "images": [tif_uri(plain)], "want_geojson": True}, 400, "not one"),
        "geojson of no CRS": ({**vg, "images": [tif_uri(no_crs)], "want_geojson": True}, 400, "has no CRS"),
        "mask geotiff of a PNG": (
            {"task": "seg", "question": "road.", "images": [data_uri(samples / IMAGE)], "mask": "geotiff"},
            400,
            "needs a georeferenced scene",
        ),
        "mask geotiff of [VG]": ({**vg, "images": [tif_uri(scene_tif)], "mask": "geotiff"}, 400, "[SEG] answer"),
        "bad bands": ({**vg, "images": [tif_uri(scene_tif)], "bands": [4, 2, 1]}, 400, "band 4 is out of range"),
        "bad mask_format": ({**vg, "images": [tif_uri(scene_tif)], "mask_format": "tiff"}, 400, "mask must be"),
        "bad tile": ({**vg, "images": [tif_uri(scene_tif)], "tile": 8}, 400, "at least 16 pixels"),
        "a scene in a pair": (
            {"task": "ccd", "question": "What changed?", "images": [tif_uri(scene_tif), tif_uri(scene_tif)]},
            400,
            "answered on its own",
        ),
    }
    with client(models) as c:
        for name, (body, status, words) in cases.items():
            r = c.post("/v1/rs/answer", json=body)
            assert r.status_code == status and words in error(r), (name, r.text)
    with client(models, max_pixels=100_000) as c:
        r = c.post("/v1/rs/answer", json={**vg, "images": [tif_uri(scene_tif)]})
        assert r.status_code == 400 and "512x512 pixels" in error(r) and "limit of 0.1 MP" in error(r)


NO_RASTERIO = """
import importlib.abc, json, sys
from pathlib import Path


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "rasterio":
            raise ImportError(name)


sys.meta_path.insert(0, Block())
from fastapi.testclient import TestClient
from rsedge.serve.app import create_app
from rsedge.serve.config import ServeConfig
from rsedge.serve.models import ModelSet

bundle, *images = sys.argv[1:]
client = TestClient(create_app(ModelSet.load([Path(bundle)]), ServeConfig()))
answers = []
for image, extra in zip(images, ({}, {}, {"bands": "1"}, {"preview": "true"})):
    form = {"task": "vg", "question": "Where?", "max_new_tokens": "4", **extra}
    r = client.post("/v1/rs/answer", data=form, files={"image": (Path(image).name, Path(image).read_bytes())})
    answers.append([r.status_code, r.json().get("error", {}).get("message"), "preview" in r.json()])
print(json.dumps(answers))
"""


def test_without_the_geo_extra_a_geotiff_names_it(tiny_bundle, scene_tif, samples, tmp_path):
    four = sixteen_bit_bgrn(tmp_path / "bgrn.tif", sample_rgb(samples))
    png = samples / IMAGE
    args = [sys.executable, "-c", NO_RASTERIO, str(tiny_bundle), str(scene_tif), str(four), str(png), str(png)]
    res = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    rgb_tif, bgrn, bands, plain = json.loads(res.stdout)
    # an 8-bit GeoTIFF Pillow could read, but not place on the map; a 16-bit one Pillow cannot read
    for status, message, _ in (rgb_tif, bgrn):
        assert status == 501 and "\n" not in message and "pip install 'rsedge[geo]'" in message
    assert bands[0] == 501 and "the bands field" in bands[1]
    assert plain == [200, None, True]  # a PNG needs nothing more, its preview included
