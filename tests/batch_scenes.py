"""An archive for the rsedge batch scene tests: sample PNGs beside GeoTIFF scenes made from a real sample (an 8-bit
one stored blue, green, red; a 16-bit four-band one; a truncated copy of it), and what answer_scene gives for each
scene called directly (the reference a batch must reproduce). Importing it skips a test module without rasterio."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from rsedge.batch.answer import Job
from rsedge.batch.items import Item
from rsedge.batch.scenes import SceneSettings
from rsedge.demo import SAMPLES
from rsedge.runtime.pipeline import Pipeline
from tests.batch_archive import comparable
from tests.geo_scenes import rgb_scene, sample_rgb, sixteen_bit_bgrn

# Both scenes hold red as band 3, green 2, blue 1: --bands 3,2,1 shows each in its true colours. Tiles of 256 with
# 32 shared over the 512-pixel sample: nine tiles a scene, a box near a tile edge seen by two and merged.
SETTINGS = SceneSettings(bands=(3, 2, 1), tile=256, overlap=32)
CLI_OPTIONS = ["--bands", "3,2,1", "--tile", "256", "--overlap", "32"]
VG = Job("[VG] Where is the storage tank?", max_new_tokens=24, scene=SETTINGS)
PNGS = ["images/dior_05863.png", "images/aid_storagetanks_207.jpg"]
SCENES = ["scenes/bgr8.tif", "scenes/bgrn16.tif"]
TRUNCATED = "scenes/truncated.tif"


def make_scene_archive(folder: Path) -> Path:
    """Two sample images, two GeoTIFF scenes of dior_05863.png and a GeoTIFF cut off half way through its pixels."""
    (folder / "images").mkdir(parents=True)
    (folder / "scenes").mkdir()
    for name in PNGS:
        shutil.copyfile(SAMPLES / Path(name).name, folder / name)
    rgb = sample_rgb(SAMPLES)
    rgb_scene(folder / SCENES[0], rgb[..., ::-1].copy())
    data = sixteen_bit_bgrn(folder / SCENES[1], rgb).read_bytes()
    (folder / TRUNCATED).write_bytes(data[: len(data) // 2])  # the header reads, the pixels do not
    return folder


def comparable_scene(answer: dict[str, Any]) -> dict[str, Any]:
    """A scene answer without what differs between two runs by nature (each tile's timings) and the batch's
    output file path."""
    out = {k: v for k, v in answer.items() if k != "geojson"}
    out["tiles"] = [{k: v for k, v in t.items() if k != "timings_ms"} for t in answer["tiles"]]
    return out


def answers_of(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """id -> (kind, comparable answer), or (kind, the error type) of an error record."""
    out = {}
    for r in records:
        if not r["ok"]:
            out[r["id"]] = (r["kind"], {"error_type": r["error_type"]})
        else:
            out[r["id"]] = (
                r["kind"],
                comparable_scene(r["answer"]) if r["kind"] == "scene" else comparable(r["answer"]),
            )
    return out


def reference(bundle: Path, items: list[Item], job: Job) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each item answered in this process: a scene by read_scene + answer_scene, an image by generate."""
    from rsedge.geo.scene import read_scene
    from rsedge.geo.tiling import answer_scene

    pipe = Pipeline.load(bundle)
    s = job.scene
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for it in items:
        path = it.paths()[0]
        try:
            if it.kind == "scene":
                scene = read_scene(path, bands=s.bands, stretch=s.stretch, gsd=s.gsd, name=it.names[0])
                ans = answer_scene(
                    pipe, scene, job.prompt, tile=s.tile, overlap=s.overlap, max_new_tokens=job.max_new_tokens
                )
                out[it.id] = (it.kind, comparable_scene(ans.to_json()))
            else:
                ans = pipe.generate([path], job.prompt, max_new_tokens=job.max_new_tokens)
                out[it.id] = (it.kind, comparable(ans.to_json()))
        except Exception as e:
            out[it.id] = (it.kind, {"error_type": type(e).__name__})
    return out
