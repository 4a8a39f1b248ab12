"""The ``scene`` item kind: a georeferenced, 16-bit or multiband raster (as rsedge.geo.scene.wants_scene decides),
read with the batch's band, stretch and ground-resolution settings and answered tile by tile
(rsedge.geo.tiling.answer_scene), its record holding the scene answer's JSON (boxes in pixels, in the scene's CRS
and in WGS84). With ``--geojson-dir`` the worker also returns the answer as GeoJSON bytes, which the driver
writes (:class:`GeoJsonWriter`): outputs land on the machine running ``rsedge batch``, as the JSONL does, even when
the scenes were answered on other Ray nodes.

rasterio (the ``geo`` extra) is imported only when a scene is read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rsedge.batch.items import Item
from rsedge.errors import OptionError, OutputError
from rsedge.fsutil import write_file_atomic

if TYPE_CHECKING:
    from rsedge.batch.answer import Job
    from rsedge.runtime.pipeline import Pipeline

# The record key carrying a scene's GeoJSON from a worker to the driver; the driver replaces it by the file's path.
GEOJSON_BYTES = "geojson_bytes"


@dataclass(frozen=True)
class SceneSettings:
    """How every scene of a batch is read and tiled (``rsedge run``'s scene options; None: that option's default).
    ``geojson``: whether workers make each answer's GeoJSON, an output that does not change the answers."""

    bands: tuple[int, ...] | None = None
    stretch: tuple[float, float] | None = None
    gsd: float | None = None
    tile: int | None = None
    overlap: int | None = None
    iou: float | None = None
    geojson: bool = False

    def check(self) -> None:
        """Settings every scene would refuse, refused once before any work (else each scene is the same error)."""
        from rsedge.geo.tiling import tile_windows

        if self.iou is not None and not 0.0 <= self.iou <= 1.0:
            raise OptionError(f"--iou must be between 0 and 1, got {self.iou}")
        if self.overlap is not None and self.overlap < 0:
            raise OptionError(f"--overlap must be at least 0, got {self.overlap}")
        if self.gsd is not None and self.gsd <= 0:
            raise OptionError(f"--gsd must be a positive number of metres, got {self.gsd}")
        if self.tile is not None:
            tile_windows(self.tile, self.tile, self.tile, self.overlap or 0)


def answer_scene_item(pipe: Pipeline, item: Item, job: Job) -> dict[str, Any]:
    """A scene: read, tiled and answered; the answer as ``rsedge run --json`` prints a scene's (without files)."""
    from rsedge.geo import DEFAULT_IOU
    from rsedge.geo.scene import read_scene
    from rsedge.geo.tiling import answer_scene

    settings = job.scene or SceneSettings()
    # named as the archive names it: the record (and an error line) reads the same on every node
    scene = read_scene(
        item.paths()[0], bands=settings.bands, stretch=settings.stretch, gsd=settings.gsd, name=item.names[0]
    )
    answer = answer_scene(
        pipe,
        scene,
        job.prompt,
        tile=settings.tile,
        overlap=settings.overlap,
        iou=DEFAULT_IOU if settings.iou is None else settings.iou,
        max_new_tokens=job.max_new_tokens,
        sampling=job.sampling(),
        expert=job.expert,
    )
    out = answer.to_json()
    if settings.geojson and scene.georeferenced:
        from rsedge.geo.geojson import geojson_bytes

        out[GEOJSON_BYTES] = geojson_bytes(answer)
    return out


def geojson_name(item_id: str) -> str:
    """Where a scene's GeoJSON goes under ``--geojson-dir``: its archive path with the suffix .geojson, kept inside
    the folder (a list file may name a scene by an absolute path or one going up with ..)."""
    path = Path(item_id)
    inside = [p for p in path.parts if p not in (path.anchor, ".", "..")]
    return Path(*inside).with_suffix(".geojson").as_posix()


class GeoJsonWriter:
    """Writes each scene record's GeoJSON under ``folder`` (the driver's side of ``--geojson-dir``; the workers'
    side is the job's ``SceneSettings(geojson=True)``)."""

    def __init__(self, folder: Path, force: bool = False) -> None:
        self.folder, self.force = Path(folder), force

    def check(self, items: Iterable[Item]) -> None:
        """Refuse, before any work, a folder that cannot be one and GeoJSON files of the scenes to answer that exist
        already (unless ``force``). Two scenes whose names differ only by their suffix would share one file."""
        if self.folder.exists() and not self.folder.is_dir():
            raise OutputError(f"--geojson-dir {self.folder} is a file; give a folder")
        seen: dict[str, str] = {}
        for it in items:
            if it.kind != "scene":
                continue
            name = geojson_name(it.id)
            if name in seen:
                raise OptionError(f"--geojson-dir: scenes {seen[name]!r} and {it.id!r} would both write {name}")
            seen[name] = it.id
            path = self.folder / name
            if not self.force and os.path.lexists(path):
                raise OptionError(
                    f"--geojson-dir: {path} already exists; pass --force to replace it (a batch killed after writing "
                    "it and before recording its scene leaves one too)"
                )

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        """The record as the output holds it: its GeoJSON bytes written to a file, the file's path in their place
        (None for a scene without a CRS, which cannot be placed on a map)."""
        answer = record.get("answer")
        if record.get("kind") != "scene" or not isinstance(answer, dict):
            return record
        data = answer.pop(GEOJSON_BYTES, None)
        if data is None:
            if answer["scene"]["crs"] is not None:  # a caller's mistake, not the scene's: say so rather than skip
                raise OptionError("the batch job's SceneSettings lack geojson=True; its workers made no GeoJSON")
            answer["geojson"] = None
            return record
        path = self.folder / geojson_name(record["id"])
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            answer["geojson"] = str(write_file_atomic(path, data, overwrite=self.force))
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
        return record
