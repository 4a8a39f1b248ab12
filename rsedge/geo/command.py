"""``rsedge run`` on a scene: its options, the checks made before the bundle loads, and the run with a progress bar.

The options live here so that cli.py gains one decorator and one branch (rsedge batch takes the reading and tiling
ones, READ_OPTIONS, through the same definitions); nothing here imports rasterio until a scene is read.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import click

from rsedge.errors import OptionError
from rsedge.fsutil import write_file_atomic
from rsedge.geo import DEFAULT_IOU


@dataclass(frozen=True)
class GeoRequest:
    """The scene options of ``rsedge run``, as given (None: not given)."""

    bands: str | None = None
    stretch: str | None = None
    tile: int | None = None
    overlap: int | None = None
    gsd: float | None = None
    iou: float | None = None
    geojson: Path | None = None
    mask_tif: Path | None = None

    @property
    def given(self) -> list[str]:
        """The options given, as the user typed them."""
        return [f"--{f.name.replace('_', '-')}" for f in fields(self) if getattr(self, f.name) is not None]


# GeoRequest field -> its option, in --help's order
_OPTIONS = {
    "bands": click.option(
        "--bands", default=None, help="scene bands to show, from 1: three (red,green,blue) or one, e.g. 3,2,1"
    ),
    "stretch": click.option(
        "--stretch",
        default=None,
        help="percentiles LOW,HIGH mapped to 0 and 255 per band [default: 2,98 for 16-bit and float scenes]",
    ),
    "tile": click.option(
        "--tile", type=int, default=None, help="tile size in pixels for a large scene [default: model input]"
    ),
    "overlap": click.option(
        "--overlap", type=int, default=None, help="pixels shared by neighbouring tiles [default: an eighth of a tile]"
    ),
    "gsd": click.option(
        "--gsd", type=float, default=None, help="resample the scene to this ground resolution, in metres"
    ),
    "iou": click.option(
        "--iou", type=float, default=None, help=f"IoU above which NMS merges tile boxes [{DEFAULT_IOU}]"
    ),
    "geojson": click.option(
        "--geojson", type=click.Path(path_type=Path), default=None, help="write boxes and mask as GeoJSON"
    ),
    "mask_tif": click.option(
        "--mask-tif", type=click.Path(path_type=Path), default=None, help="write a [SEG] mask as a label GeoTIFF"
    ),
}
# The options that decide how a scene is read and tiled (rsedge batch takes these; its outputs are its own).
READ_OPTIONS = ("bands", "stretch", "tile", "overlap", "gsd", "iou")


def scene_options(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator adding the named scene options (GeoRequest fields) to a click command; it receives them as one
    ``geo: GeoRequest`` argument, the options it lacks None."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            request = GeoRequest(**{n: kwargs.pop(n) for n in names})
            return command(*args, geo=request, **kwargs)

        for name in reversed(names):
            wrapper = _OPTIONS[name](wrapper)
        return wrapper

    return decorate


# rsedge run: every scene option
geo_options = scene_options(*(f.name for f in fields(GeoRequest)))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    except OSError:
        return False


def _check_output(option: str, path: Path, images: Sequence[Path], force: bool) -> None:
    if path.is_dir():
        raise OptionError(f"{option} {path} is a folder; give the path of a file to write")
    if not path.parent.is_dir():
        raise OptionError(f"{option} {path}: no such folder {path.parent}")
    for im in images:
        if _same_file(path, im):
            raise OptionError(f"{option} {path} is the input image {im}; choose another file")
    if not force and os.path.lexists(path):
        raise OptionError(f"{option} {path} already exists; pass --force to replace it")


def prepare_scene(request: GeoRequest, images: Sequence[Path], prompt: str, force: bool) -> Any:
    """The scene to answer, read and checked before any bundle loads; None for the Pillow path (no scene option
    given, and the image is not a raster only GDAL reads)."""
    from rsedge.geo import available
    from rsedge.geo.scene import parse_bands, parse_stretch, read_scene, wants_scene

    given = request.given
    if not given and not (len(images) == 1 and wants_scene(images[0])):
        return None
    if given and not available():
        from rsedge.geo import INSTALL_HINT

        raise OptionError(f"{given[0]} reads the image as a georeferenced scene, which needs rasterio: {INSTALL_HINT}")
    if len(images) != 1:
        raise OptionError(f"{', '.join(given) or 'a scene'}: give one scene (--image), got {len(images)} images")
    for option, path in (("--geojson", request.geojson), ("--mask-tif", request.mask_tif)):
        if path is not None:
            _check_output(option, path, images, force)
    if request.mask_tif is not None:
        from rsedge.runtime.router import task_tag

        if task_tag(prompt) != "[SEG]":
            raise OptionError("--mask-tif writes a [SEG] answer's mask; the prompt has no [SEG] tag")
    scene = read_scene(
        images[0],
        bands=parse_bands(request.bands) if request.bands is not None else None,
        stretch=parse_stretch(request.stretch) if request.stretch is not None else None,
        gsd=request.gsd,
    )
    for option, path in (("--geojson", request.geojson), ("--mask-tif", request.mask_tif)):
        if path is not None and not scene.georeferenced:
            raise OptionError(f"{option}: {images[0]} has no CRS, so its answer cannot be placed on a map")
    if request.tile is not None:  # bad tiling refused before the bundle loads (the default tile is the bundle's)
        from rsedge.geo.tiling import tile_windows

        tile_windows(scene.width, scene.height, request.tile, request.overlap or 0)
    if request.overlap is not None and request.overlap < 0:
        raise OptionError(f"--overlap must be at least 0, got {request.overlap}")
    return scene


def run_scene(
    pipe: Any,
    scene: Any,
    request: GeoRequest,
    prompt: str,
    overlay: Path | None,
    force: bool,
    **generate: Any,
) -> dict[str, Any]:
    """Answer the scene (a progress bar on a terminal), write the asked-for files, return the JSON record."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from rsedge.geo.tiling import answer_scene

    console = Console(stderr=True)
    columns = (TextColumn("tiles"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal, transient=True) as progress:
        task = progress.add_task("tiles", total=None)
        answer = answer_scene(
            pipe,
            scene,
            prompt,
            tile=request.tile,
            overlap=request.overlap,
            iou=DEFAULT_IOU if request.iou is None else request.iou,
            on_tile=lambda done, total: progress.update(task, completed=done, total=total),
            **generate,
        )
    out = answer.to_json()
    # each file is made in memory first, so a refusal or a failure while making one writes nothing half-done
    files: list[tuple[str, Path, bytes]] = []
    if request.geojson is not None:
        from rsedge.geo.geojson import geojson_bytes

        files.append(("geojson", request.geojson, geojson_bytes(answer)))
    if request.mask_tif is not None:
        from rsedge.geo.mask_tif import mask_geotiff_bytes

        files.append(("mask_tif", request.mask_tif, mask_geotiff_bytes(answer)))
    for key, path, data in files:
        out[key] = str(write_file_atomic(path, data, overwrite=force))
    if overlay is not None:
        out["overlay"] = _overlay(answer, overlay, force)
    return out


def summary(out: dict[str, Any]) -> str:
    """One line on what a scene's answer holds, for a person at a terminal."""
    t = out["tiling"]
    skipped = f" ({t['skipped_nodata_tiles']} without data, not run)" if t["skipped_nodata_tiles"] else ""
    parts = [f"{t['tiles']} tile{'s' if t['tiles'] != 1 else ''}{skipped}"]
    if "boxes" in out or t["boxes_before_nms"]:
        kept = len(out.get("boxes", []))
        parts.append(f"{kept} box{'es' if kept != 1 else ''} after NMS ({t['boxes_before_nms']} before)")
    if "mask" in out:
        parts.append(f"mask labels {', '.join(out['mask']['labels'])}")
    crs = out["scene"]["crs"] or "no CRS"
    return f"scene {out['scene']['size'][0]}x{out['scene']['size'][1]} ({crs}): " + "; ".join(parts)


def _overlay(answer: Any, path: Path, force: bool) -> str | None:
    """The scene as the model saw it (bands, stretch, resampling) with the merged boxes or the stitched mask."""
    from rsedge.geo.tiling import MASK_NODATA
    from rsedge.runtime.outputs import draw_boxes, draw_mask

    image = answer.scene.image()
    if answer.boxes:
        return str(draw_boxes(image, [sb.box for sb in answer.boxes], path, overwrite=force))
    if answer.mask is not None:
        labelled = (answer.mask != 0) & (answer.mask != MASK_NODATA)
        return str(draw_mask(image, labelled, path, overwrite=force))
    return None
