"""The built-in grounding-with-reasoning calibration set: referring expressions on the shipped real RS images, asked
in the prompt style of reasoning grounders (VLM-R1 / RSGround-R1 on Qwen2.5-VL), answered in their format.

Each item asks for one object of a real DIOR / DOTA image of the package's train split (never its test split), by a
DIOR-RSVG-style referring expression made from the annotation: its position ("the windmill in the upper right"), its
size against the image ("the large baseball field on the right"), or its place next to the other object of the same
image ("the vehicle to the left of the baseball field"). The answer is the trained shape,
``<think>...</think>\\n<answer>[{"bbox_2d": [x1, y1, x2, y2], "label": ...}]</answer>``, with the box in integer pixels
of the image as Qwen2.5-VL's processor resizes it (smart_resize with the processor's defaults, recorded in the set's
``box_space``), so teacher-forced calibration sees the answer tokens a reasoning grounder writes. The reasoning is a
templated description of the annotation (the object's place and size), not a model's own: calibration needs text of
the right shape and vocabulary, not a model's reasoning.

Deterministic and hashed like rs-default: candidates are ordered by sha256 of (seed, key), every object comes once
before any comes twice, and the set's ``content_hash`` covers prompts, answers and image pixels.

Runtime module: numpy, Pillow and the stdlib only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from rsedge.calibration.calibset import (
    DATA_DIR,
    CalibrationSet,
    _make_items,
    _real_test_files,
    _unique_images,
    content_hash,
    pixel_digest,
    prepare_image,
)
from rsedge.calibration.readers import CalibItem, CalibrationError
from rsedge.errors import OptionError
from rsedge.runtime.reasoning import smart_resize
from rsedge.synth.real import REAL_DIR, read_manifest
from rsedge.synth.tasks import article

RS_GROUNDING_REASONING = "rs-grounding-reasoning"
TASK = "vgr"  # grounding with reasoning (rsedge.metrics.tasks scores it)
# Qwen2.5-VL's image processor defaults: the box space of the answers.
RESIZE = {"factor": 28, "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16384}
PROMPTS = {
    # VLM-R1's referring-expression prompt (the RSGround-R1 / RSThinker family follow it)
    "vlm-r1": (
        "Please provide the bounding box coordinate of the region this sentence describes: {expr}. First output the "
        "thinking process in <think> </think> tags and then output the final answer in <answer> </answer> tags. "
        "Output the final answer in JSON format."
    ),
    # Qwen2.5-VL's own grounding request, with the reasoning format asked for
    "qwen2.5-vl": (
        "Locate {expr}, and output its bbox coordinates in JSON format. Reason step by step inside <think> </think> "
        "tags first, then give the answer inside <answer> </answer> tags."
    ),
}


Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class GroundedObject:
    """One annotated object of a shipped image, its box in pixels of the image as a calibration set stores it."""

    image: Path
    source: str
    category: str
    box: Box
    size: tuple[int, int]  # (width, height) as stored (at most MAX_SIDE)
    others: tuple[tuple[str, Box], ...]  # the image's other objects


def _objects() -> list[GroundedObject]:
    """Every grounding annotation of the real train split, boxes scaled to the stored image."""
    test_paths, test_digests = _real_test_files()
    out = []
    for item in read_manifest(REAL_DIR):
        if item["split"] != "train" or not item.get("grounding") or len(item["files"]) != 1:
            continue
        path = REAL_DIR / item["files"][0]
        stored = prepare_image(path)
        if path.resolve() in test_paths or pixel_digest(stored) in test_digests:  # the test split never
            continue
        with Image.open(path) as im:
            sx, sy = stored.width / im.width, stored.height / im.height
        boxes = [(g["expression"], _scaled(g["box"], sx, sy)) for g in item["grounding"]]
        for k, (category, box) in enumerate(boxes):
            others = tuple(b for j, b in enumerate(boxes) if j != k)
            out.append(GroundedObject(path, f"rsedge-real:{item['id']}#{k}", category, box, stored.size, others))
    return out


def _scaled(box: list[float], sx: float, sy: float) -> Box:
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def _position(box: Box, size: tuple[int, int]) -> str:
    """Where the box's centre lies, in thirds: "in the upper right of the image", "in the centre of the image"."""
    w, h = size
    cx, cy = (box[0] + box[2]) / 2 / w, (box[1] + box[3]) / 2 / h
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    row = "upper" if cy < 1 / 3 else "lower" if cy > 2 / 3 else ""
    if not col and not row:
        return "in the centre of the image"
    if not row:
        return f"on the {col} side of the image"
    if not col:
        return f"in the {row} part of the image"
    return f"in the {row} {col} of the image"


def _size_word(box: Box, size: tuple[int, int]) -> str:
    share = (box[2] - box[0]) * (box[3] - box[1]) / (size[0] * size[1])
    return "large" if share > 0.08 else "small" if share < 0.005 else ""


def _relation(box: Box, other: Box) -> str:
    """Where ``box`` lies against ``other``, along the axis their centres differ most."""
    dx = (box[0] + box[2] - other[0] - other[2]) / 2
    dy = (box[1] + box[3] - other[1] - other[3]) / 2
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def expressions(obj: GroundedObject) -> list[tuple[str, str]]:
    """(key, referring expression) of an object: by position, by size and position, by its neighbour."""
    position = _position(obj.box, obj.size)
    size = _size_word(obj.box, obj.size)
    out = [("position", f"the {obj.category} {position}")]
    if size:
        out.append(("size", f"the {size} {obj.category} {position.replace(' of the image', '')}"))
    for other, other_box in obj.others:
        out.append((f"next-to-{other}", f"the {obj.category} {_relation(obj.box, other_box)} the {other}"))
    return out


def resized_box(obj: GroundedObject) -> tuple[list[int], tuple[int, int]]:
    """The box as the model answers it, integer pixels of the smart-resized input, and that input's (height, width)."""
    w, h = obj.size
    rh, rw = smart_resize(h, w, **RESIZE)
    x1, y1, x2, y2 = obj.box
    box = [math.floor(v + 0.5) for v in (x1 * rw / w, y1 * rh / h, x2 * rw / w, y2 * rh / h)]
    return box, (rh, rw)


def answer_text(obj: GroundedObject, expr: str) -> str:
    """A reasoning grounder's answer: a templated account of the object's place, then the box as bbox_2d JSON."""
    box, (rh, rw) = resized_box(obj)
    bw, bh = box[2] - box[0], box[3] - box[1]
    thought = (
        f"The request is {expr}. I look for {article(obj.category)} {obj.category} in the image. There is one "
        f"{_position(obj.box, obj.size)}, about {bw} by {bh} pixels of the {rw} by {rh} image"
    )
    for other, other_box in obj.others:
        thought += f", {_relation(obj.box, other_box)} the {other}"
    thought += ". That object matches the description, so I give its bounding box."
    label = json.dumps([{"bbox_2d": box, "label": obj.category}], ensure_ascii=False)
    return f"<think>{thought}</think>\n<answer>{label}</answer>"


def _order(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}\0{RS_GROUNDING_REASONING}\0{key}".encode()).hexdigest()


@functools.lru_cache(maxsize=8)
def rs_grounding_reasoning(size: int = 24, seed: int = 0) -> CalibrationSet:
    """The built-in grounding-with-reasoning set of ``size`` items (see the module's docstring). Every object comes
    once before any comes twice; within that, items go in sha256 order of (seed, key). Lives in memory like
    rs-default; ``.save(path)`` writes it out with the same content_hash."""
    if size < 1:
        raise OptionError(f"size must be at least 1, got {size}")
    objects = _objects()
    if not objects:
        raise CalibrationError("no grounding annotations in the shipped real train split")
    per_object = []
    for obj in objects:
        cands = [(f"{obj.source}/{k}/{style}", expr, style, obj) for k, expr in expressions(obj) for style in PROMPTS]
        per_object.append(sorted(cands, key=lambda c: _order(seed, c[0])))
    per_object.sort(key=lambda cands: _order(seed, cands[0][0]))
    picked = []
    for depth in range(max(len(c) for c in per_object)):  # round robin: image and object diversity first
        picked += [(obj_c, depth) for obj_c in range(len(per_object)) if depth < len(per_object[obj_c])]
    total = len(picked)
    repeats = max(0, size - total)
    chosen = []
    for k in range(size):
        o, depth = picked[k % total]
        key, expr, style, obj = per_object[o][depth]
        chosen.append(CalibItem([obj.image], PROMPTS[style].format(expr=expr), answer_text(obj, expr), TASK, key))
    # as rs-default makes its items, so a saved copy (CalibrationSet.save) keeps the content_hash
    items = _make_items(chosen, lambda p: p.relative_to(DATA_DIR).as_posix())
    digests = {rel: pixel_digest(prepare_image(DATA_DIR / rel)) for rel in _unique_images(items)}
    info = {
        "name": RS_GROUNDING_REASONING,
        "seed": seed,
        "size": size,
        "repeats": repeats,
        "box_space": {"kind": "qwen2.5-vl smart_resize of the stored image", **RESIZE},
        "prompt_styles": sorted(PROMPTS),
        "sources": [{"path": "rsedge/data/real (train split, grounding annotations)", "format": "rsedge-real"}],
    }
    return CalibrationSet(root=DATA_DIR, items=tuple(items), content_hash=content_hash(items, digests), info=info)
