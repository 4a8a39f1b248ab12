"""The operator's console in a real headless Chromium (Debian's, driven by Playwright): an image, a pair and a
mask, each answer streamed into the page equal to Pipeline.generate's, boxes and masks drawn over the image; a
GeoTIFF dropped in is answered by the service, shown as its preview with the boxes, and its GeoJSON downloads.

Skipped where Playwright or a Chromium is missing (``apt-get install chromium``; ``pip install playwright``)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from rsedge.runtime.pipeline import Pipeline
from rsedge.serve.app import create_app
from rsedge.serve.config import ServeConfig
from rsedge.serve.models import ModelSet
from tests.serve_helpers import IMAGE, PAIR, LiveServer, data_uri

GEO_QUESTION = "Where is the storage tank?"

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("RSEDGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium)")
CHANGE_PAIR = ("levircd_test_2_0000_0000_A.png", "levircd_test_2_0000_0000_B.png")


@pytest.fixture(scope="module")
def page_at(demo_bundle):
    with LiveServer(create_app(ModelSet.load([demo_bundle]), ServeConfig())) as srv, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(srv.url + "/")
        page.wait_for_function("document.getElementById('model').options.length > 0")
        yield page, srv.url
        browser.close()


def ask(page, files, task: str, question: str) -> str:
    page.set_input_files("#files", [str(f) for f in files])
    page.wait_for_function(f"document.querySelectorAll('canvas').length === {len(files)}")
    page.select_option("#task", task)
    page.fill("#question", question)
    page.click("#ask")
    page.wait_for_function("document.getElementById('meta').textContent.includes('expert')", timeout=60_000)
    assert page.text_content("#error") == ""
    return page.text_content("#answer")


def pixel(page, canvas: int, x: int, y: int) -> list[int]:
    return page.evaluate(
        f"Array.from(document.querySelectorAll('canvas')[{canvas}].getContext('2d').getImageData({x}, {y}, 1, 1).data)"
    )


def test_boxes_over_an_image(page_at, demo_bundle, samples):
    page, _ = page_at
    want = Pipeline.load(demo_bundle).generate([samples / IMAGE], "[VG] Where is the windmill?")
    assert want.boxes, "the built-in model finds the windmill"
    assert ask(page, [samples / IMAGE], "[VG]", "Where is the windmill?") == want.text
    box = want.boxes[0]
    # the first box is outlined in blue, as rsedge run --overlay draws it
    assert pixel(page, 0, round(box.x1), round((box.y1 + box.y2) / 2))[:3] == [0, 0, 255]


def test_a_pair(page_at, demo_bundle, samples):
    page, _ = page_at
    prompt = "Please briefly describe the changes in these two images."
    want = Pipeline.load(demo_bundle).generate([samples / n for n in PAIR], f"[CCD] {prompt}")
    assert ask(page, [samples / n for n in PAIR], "[CCD]", prompt) == want.text
    assert page.locator("figcaption").all_text_contents() == [f"before: {PAIR[0]}", f"after: {PAIR[1]}"]


def test_a_change_mask_over_the_after_image(page_at, samples):
    page, url = page_at
    images = [samples / n for n in CHANGE_PAIR]
    question = "Please segment the building area that have changed in the second image."
    body = {"task": "seg", "question": question, "images": [data_uri(p) for p in images], "mask": "png"}
    want = httpx.post(f"{url}/v1/rs/answer", json=body, timeout=60).json()
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(want["mask"]["png"])))) > 0
    assert mask.any(), "the built-in model outlines changed buildings"
    assert ask(page, images, "[SEG]", question) == want["text"]
    page.wait_for_timeout(300)  # the mask PNG is decoded asynchronously by the page
    after = np.asarray(Image.open(images[1]).convert("RGB")).astype(int)
    ys, xs = (v[:20] for v in np.nonzero(mask))
    drawn = np.array([pixel(page, 1, int(x), int(y))[:3] for y, x in zip(ys, xs, strict=True)])
    under = after[ys, xs]
    # tinted red at 45 % where the mask is set (as rsedge run --overlay), within rounding
    np.testing.assert_allclose(drawn, under * 0.55 + np.array([255, 0, 0]) * 0.45, atol=3)
    y, x = (int(v[0]) for v in np.nonzero(~mask))
    assert pixel(page, 1, x, y)[:3] == after[y, x].tolist()  # untouched elsewhere
    assert pixel(page, 0, x, y)[:3] == np.asarray(Image.open(images[0]).convert("RGB"))[y, x].tolist()


def drop(page, path: Path) -> None:
    """Drop a file on the drop zone as a person's drag does: a DataTransfer holding it, in a drop event."""
    page.evaluate(
        """([name, b64]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, { type: "image/tiff" }));
            const drop = new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true });
            document.getElementById("drop").dispatchEvent(drop);
        }""",
        [path.name, base64.b64encode(path.read_bytes()).decode()],
    )


def test_a_geotiff_dropped_in(page_at, samples, tmp_path):
    pytest.importorskip("rasterio")
    pyogrio = pytest.importorskip("pyogrio")
    from tests.geo_scenes import rgb_scene, sample_rgb

    page, url = page_at
    rgb = sample_rgb(samples)
    scene = rgb_scene(tmp_path / "scene.tif", rgb)
    uri = "data:image/tiff;base64," + base64.b64encode(scene.read_bytes()).decode()
    body = {"task": "vg", "question": GEO_QUESTION, "images": [uri], "want_geojson": True}
    want = httpx.post(f"{url}/v1/rs/answer", json=body, timeout=120).json()
    assert want["boxes"], "the demo model finds the storage tank"
    drop(page, scene)
    page.wait_for_function("document.querySelector('figcaption') && document.querySelectorAll('canvas').length === 1")
    assert page.text_content("figcaption") == "scene.tif (georeferenced)"
    page.select_option("#task", "[VG]")
    page.fill("#question", GEO_QUESTION)
    page.click("#ask")
    page.wait_for_function("document.getElementById('meta').textContent.includes('expert')", timeout=120_000)
    assert page.text_content("#error") == ""
    assert page.text_content("#answer") == want["text"]
    assert "25 tile(s)" in page.text_content("#meta") and "EPSG:32633" in page.text_content("#meta")
    # the service's preview at the scene's size, the first box outlined in blue over it
    size = page.evaluate("(c => [c.width, c.height])(document.querySelector('canvas'))")
    assert size == [512, 512]
    x1, y1, _, y2 = want["boxes"][0]
    assert pixel(page, 0, round(x1), round((y1 + y2) / 2))[:3] == [0, 0, 255]
    # away from every box (and its label), the canvas holds the scene's own pixels
    clear = [(x, y) for x in (3, 256, 508) for y in (3, 256, 508) if all(_away(b, x, y) for b in want["boxes"])]
    assert clear and all(pixel(page, 0, x, y)[:3] == rgb[y, x].tolist() for x, y in clear)
    with page.expect_download() as download:
        page.click("#geojson")
    saved = Path(download.value.path())
    assert download.value.suggested_filename == "scene.geojson"
    assert json.loads(saved.read_text())["features"] == want["geojson"]["features"]
    info = pyogrio.read_info(saved, layer=0)
    assert info["features"] == len(want["boxes"]) and "4326" in info["crs"]


def test_a_16_bit_scene_picked_with_its_bands_gives_a_mask_geotiff(page_at, samples, tmp_path):
    rasterio = pytest.importorskip("rasterio")
    from tests.geo_scenes import sample_rgb, sixteen_bit_bgrn

    page, url = page_at
    scene = sixteen_bit_bgrn(tmp_path / "bgrn.tif", sample_rgb(samples))
    question = "Please segment the road area."
    uri = "data:image/tiff;base64," + base64.b64encode(scene.read_bytes()).decode()
    body = {"task": "seg", "question": question, "images": [uri], "bands": "3,2,1", "mask": "geotiff"}
    want = httpx.post(f"{url}/v1/rs/answer", json=body, timeout=120).json()
    page.set_input_files("#files", [str(scene)])
    page.wait_for_function("(document.querySelector('figcaption') || {}).textContent === 'bgrn.tif (georeferenced)'")
    page.select_option("#task", "[SEG]")
    page.fill("#question", question)
    page.fill("#bands", "3,2,1")
    page.click("#ask")
    page.wait_for_function("document.getElementById('meta').textContent.includes('expert')", timeout=120_000)
    page.fill("#bands", "")
    assert page.text_content("#error") == "" and page.text_content("#answer") == want["text"]
    assert page.locator("#downloads a").all_text_contents() == ["Download GeoJSON", "Download mask GeoTIFF"]
    with page.expect_download() as download:
        page.click("#masktif")
    assert download.value.suggested_filename == "bgrn-mask.tif"
    with rasterio.open(download.value.path()) as got, rasterio.open(scene) as original:
        assert got.crs == original.crs and got.transform == original.transform
        with rasterio.io.MemoryFile(base64.b64decode(want["mask"]["geotiff"])) as mem, mem.open() as served:
            assert np.array_equal(got.read(1), served.read(1))


def _away(box: list[float], x: int, y: int, margin: int = 30) -> bool:
    x1, y1, x2, y2 = box
    return not (x1 - margin <= x <= x2 + margin and y1 - margin <= y <= y2 + margin)
