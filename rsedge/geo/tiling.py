"""Answer a scene larger than the model's input: tiles with overlap, each answered on its own, boxes mapped back to
scene pixels and merged by non-maximum suppression, masks stitched.

Tiles lie on a grid: ``tile`` pixels wide with ``overlap`` pixels shared with each neighbour, the last row and
column moved back to end at the scene's edge, so every tile is full size and no pixel is padding. A scene no
larger than one tile is one tile, the whole scene, as ``rsedge run`` on a PNG would see it. Tiles that hold no
valid pixel are not run.

Stitching gives each scene pixel to the tile whose centre is nearest (per axis: the boundary between two
neighbours is halfway between their centres), so a mask pixel comes from the tile that saw the most context
around it, and tile edges, where the model sees least, are never used where a neighbour covers them.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from rsedge.errors import OptionError
from rsedge.geo import DEFAULT_IOU, DEFAULT_OVERLAP_FRACTION
from rsedge.geo.scene import Scene
from rsedge.runtime.outputs import BACKGROUND, Box
from rsedge.runtime.router import task_tag
from rsedge.runtime.sampling import Sampling

MASK_NODATA = 255  # label value of pixels that hold no data (or whose tile gave no parsable mask)


@dataclass(frozen=True)
class Window:
    """A tile: its top-left pixel in the scene and its size."""

    col: int
    row: int
    width: int
    height: int

    def to_list(self) -> list[int]:
        return [self.col, self.row, self.width, self.height]


@dataclass
class SceneBox:
    """A box in scene pixels (of ``Scene.rgb``), the tile that found it and its answer's score."""

    box: Box
    tile: int
    score: float


@dataclass
class TileAnswer:
    index: int
    window: Window
    text: str
    score: float | None
    boxes: int
    tokens: int
    stopped_by: str
    timings: dict[str, float]
    prompt_tokens: int = 0


@dataclass
class SceneAnswer:
    """Everything a scene's answer holds: merged boxes, the stitched mask, and each tile's own answer."""

    scene: Scene
    prompt: str
    tag: str | None
    expert: int
    tile_size: int
    overlap: int
    iou: float
    tiles: list[TileAnswer]
    boxes: list[SceneBox] = field(default_factory=list)
    boxes_before_nms: int = 0
    mask: np.ndarray | None = None  # [H, W] uint8 label indices into mask_labels, MASK_NODATA where unknown
    mask_labels: list[str] = field(default_factory=list)
    skipped_tiles: int = 0
    cancelled: bool = False  # stopped before its last tile (a service's client left, or its deadline passed)

    @property
    def stopped_by(self) -> str:
        """What ended the answer: ``cancelled``, ``max_new_tokens`` when a tile's answer was cut short, else
        ``eos`` (as Pipeline's Answer says it, so a service reports a scene as it reports an image)."""
        if self.cancelled:
            return "cancelled"
        return "max_new_tokens" if any(t.stopped_by == "max_new_tokens" for t in self.tiles) else "eos"

    @property
    def text(self) -> str:
        """The answer's text: one tile's, or each tile's on its own line prefixed by its window."""
        if len(self.tiles) == 1:
            return self.tiles[0].text
        return "\n".join(f"tile {t.index} {t.window.to_list()}: {t.text}" for t in self.tiles)

    def box_record(self, sb: SceneBox) -> dict[str, Any]:
        """A box in scene pixels, source pixels and, when georeferenced, corners in the scene's CRS and in WGS84
        (longitude, latitude)."""
        b = sb.box
        xs, ys = [b.x1, b.x2, b.x2, b.x1], [b.y1, b.y1, b.y2, b.y2]
        src = self.scene.to_source_pixels(xs, ys)
        out: dict[str, Any] = {
            "pixel": [round(v, 3) for v in b.to_list()],
            "source_pixel": [
                round(min(p[0] for p in src), 3),
                round(min(p[1] for p in src), 3),
                round(max(p[0] for p in src), 3),
                round(max(p[1] for p in src), 3),
            ],
            "tile": sb.tile,
            "score": round(sb.score, 6),
        }
        if self.scene.georeferenced:
            from rasterio.warp import transform

            corners = self.scene.to_map(xs, ys)
            out["map_polygon"] = [list(p) for p in corners]
            lon, lat = transform(self.scene.crs, "EPSG:4326", [p[0] for p in corners], [p[1] for p in corners])
            out["lonlat_polygon"] = [[float(x), float(y)] for x, y in zip(lon, lat, strict=True)]
        return out

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "text": self.text,
            "prompt": self.prompt,
            "tag": self.tag,
            "expert": self.expert,
            "scene": self.scene.to_json(),
            "tiling": {
                "tile": self.tile_size,
                "overlap": self.overlap,
                "tiles": len(self.tiles),
                "skipped_nodata_tiles": self.skipped_tiles,
                "nms_iou": self.iou,
                "boxes_before_nms": self.boxes_before_nms,
            },
            "cancelled": self.cancelled,
            "tiles": [
                {
                    "index": t.index,
                    "window": t.window.to_list(),
                    "text": t.text,
                    "score": t.score,
                    "boxes": t.boxes,
                    "tokens": t.tokens,
                    "stopped_by": t.stopped_by,
                    "timings_ms": {k: round(v, 3) for k, v in t.timings.items()},
                }
                for t in self.tiles
            ],
        }
        if self.boxes:
            out["boxes"] = [self.box_record(sb) for sb in self.boxes]
        if self.mask is not None:
            counts = np.bincount(self.mask.ravel(), minlength=256)
            out["mask"] = {
                "labels": self.mask_labels,
                "shape": [int(s) for s in self.mask.shape],
                "pixels": {name: int(counts[i]) for i, name in enumerate(self.mask_labels)},
                "nodata_pixels": int(counts[MASK_NODATA]),
            }
        return out


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    return [*starts, length - tile]


def tile_windows(width: int, height: int, tile: int, overlap: int) -> list[Window]:
    """Row-major tiles covering a width x height scene (see the module docstring)."""
    if tile < 16:
        raise OptionError(f"--tile must be at least 16 pixels, got {tile}")
    if not 0 <= overlap <= tile // 2:
        raise OptionError(f"--overlap must be between 0 and half the tile ({tile // 2}), got {overlap}")
    tw, th = min(tile, width), min(tile, height)
    return [Window(c, r, tw, th) for r in _starts(height, tile, overlap) for c in _starts(width, tile, overlap)]


def _cores(starts: list[int], size: int, length: int) -> list[tuple[int, int]]:
    """Per tile along one axis, the half-open range of scene pixels it owns when stitching."""
    centres = [s + size / 2 for s in starts]
    cuts = [0, *(math.floor((a + b) / 2) for a, b in itertools.pairwise(centres)), length]
    return list(itertools.pairwise(cuts))


def nms(boxes: list[SceneBox], iou: float) -> list[SceneBox]:
    """Greedy non-maximum suppression: best score first, dropping boxes overlapping a kept one by more than
    ``iou`` (intersection over union). Ties keep tile order."""
    if not boxes:
        return []
    coords = np.array([sb.box.to_list() for sb in boxes], dtype=np.float64)
    areas = (coords[:, 2] - coords[:, 0]) * (coords[:, 3] - coords[:, 1])
    order = sorted(range(len(boxes)), key=lambda i: -boxes[i].score)
    kept: list[int] = []
    for i in order:
        ok = True
        for k in kept:
            w = min(coords[i, 2], coords[k, 2]) - max(coords[i, 0], coords[k, 0])
            h = min(coords[i, 3], coords[k, 3]) - max(coords[i, 1], coords[k, 1])
            inter = max(w, 0.0) * max(h, 0.0)
            union = areas[i] + areas[k] - inter
            if union > 0 and inter / union > iou:
                ok = False
                break
        if ok:
            kept.append(i)
    return [boxes[i] for i in kept]


def answer_score(step_logits: list[np.ndarray] | None, tokens: list[int]) -> float | None:
    """The model's confidence in its answer: the geometric mean of the probability it gave each generated token
    (softmax of the raw logits), over every generated token, the end-of-sequence one included."""
    if not step_logits:
        return None
    logps = []
    for logits, tok in zip(step_logits, tokens, strict=False):
        z = np.asarray(logits, dtype=np.float64).ravel()
        top = z.max()
        logps.append(z[tok] - top - math.log(np.exp(z - top).sum()))
    return float(math.exp(sum(logps) / len(logps)))


def _tile_mask(answer: Any, window: Window) -> np.ndarray | None:
    if answer.mask is None:
        return None
    small = Image.fromarray(answer.mask.grid)
    return np.asarray(small.resize((window.width, window.height), Image.NEAREST))


def answer_scene(
    pipe: Any,
    scene: Scene,
    prompt: str,
    tile: int | None = None,
    overlap: int | None = None,
    iou: float = DEFAULT_IOU,
    max_new_tokens: int = 256,
    sampling: Sampling | None = None,
    expert: int | None = None,
    on_tile: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
) -> SceneAnswer:
    """Answer ``prompt`` about ``scene`` with ``pipe`` (a :class:`rsedge.runtime.pipeline.Pipeline`), tile by tile.

    ``tile`` defaults to the family's tile size (the bundle's input size); ``overlap`` is in pixels of the scene
    (default an eighth of a tile); boxes of all tiles are
    merged by NMS at ``iou``; [SEG] masks are stitched into one label grid over the scene. ``on_tile(done,
    total)`` is called after each tile (a progress bar). Box scores are :func:`answer_score` of their tile.
    ``cancel``, once set, stops the answer between tiles (and the tile being decoded, through Pipeline.generate):
    the answer then holds the tiles done so far and ``cancelled`` is true.
    """
    if not 0.0 <= iou <= 1.0:
        raise OptionError(f"--iou must be between 0 and 1, got {iou}")
    size = int(tile or pipe.family.tile_size())
    if overlap is None:
        overlap = int(size * DEFAULT_OVERLAP_FRACTION)
    windows = tile_windows(scene.width, scene.height, size, overlap)
    tag = task_tag(prompt)
    chosen = pipe.choose_expert(prompt, expert)
    tiles: list[TileAnswer] = []
    found: list[SceneBox] = []
    labels = [BACKGROUND]
    mask: np.ndarray | None = None
    xs = sorted({w.col for w in windows})
    ys = sorted({w.row for w in windows})
    core_x = dict(zip(xs, _cores(xs, windows[0].width, scene.width), strict=True))
    core_y = dict(zip(ys, _cores(ys, windows[0].height, scene.height), strict=True))
    skipped = 0
    cancelled = False
    for n, w in enumerate(windows):
        if cancel is not None and cancel.is_set():  # a scene is many generate calls: nobody waits for the rest
            cancelled = True
            break
        valid = scene.valid[w.row : w.row + w.height, w.col : w.col + w.width]
        if not valid.any():  # nothing to see: a tile of black nodata would only invite made-up answers
            skipped += 1
            if on_tile is not None:
                on_tile(n + 1, len(windows))
            continue
        ans = pipe.generate(
            [scene.image(w.col, w.row, w.width, w.height)],
            prompt,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            expert=expert,
            keep_logits=tag == "[VG]",  # boxes are ranked by the score; a long mask answer's logits cost memory
            cancel=cancel,
        )
        score = answer_score(ans.step_logits, ans.tokens)
        ans.step_logits = None
        index = len(tiles)
        kept = 0
        for b in ans.boxes:
            moved = Box(b.x1 + w.col, b.y1 + w.row, b.x2 + w.col, b.y2 + w.row)
            # a box wholly over nodata is about black padding, not the scene
            inside = valid[int(b.y1) : math.ceil(b.y2) or 1, int(b.x1) : math.ceil(b.x2) or 1]
            if inside.any():
                found.append(SceneBox(moved, index, score if score is not None else 1.0))
                kept += 1
        if ans.tag == "[SEG]":
            if mask is None:
                mask = np.full((scene.height, scene.width), MASK_NODATA, np.uint8)
            local = _tile_mask(ans, w)
            if local is not None:
                lookup = np.zeros(256, np.uint8)
                for i, name in enumerate(ans.mask.labels):
                    if name not in labels and len(labels) < MASK_NODATA:
                        labels.append(name)
                    lookup[i] = labels.index(name) if name in labels else 0
                (x0, x1), (y0, y1) = core_x[w.col], core_y[w.row]
                part = lookup[local[y0 - w.row : y1 - w.row, x0 - w.col : x1 - w.col]]
                mask[y0:y1, x0:x1] = part
        tiles.append(
            TileAnswer(
                index, w, ans.text, score, kept, len(ans.tokens), ans.stopped_by, dict(ans.timings), ans.prompt_tokens
            )
        )
        if on_tile is not None:
            on_tile(n + 1, len(windows))
    if mask is not None:
        mask[~scene.valid] = MASK_NODATA
    return SceneAnswer(
        scene=scene,
        prompt=prompt,
        tag=tag,
        expert=chosen,
        tile_size=size,
        overlap=overlap,
        iou=iou,
        tiles=tiles,
        boxes=nms(found, iou),
        boxes_before_nms=len(found),
        mask=mask,
        mask_labels=labels if mask is not None else [],
        skipped_tiles=skipped,
        cancelled=cancelled or any(t.stopped_by == "cancelled" for t in tiles),
    )
