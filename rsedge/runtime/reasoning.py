"""Read reasoning-grounding answers: ``<think>...</think><answer>...</answer>`` with boxes, and map the boxes back.

Reasoning grounders (RSGround-R1, RSThinker, VLM-R1-style models on Qwen2.5-VL) think in a ``<think>`` block and
answer in an ``<answer>`` block, with boxes as ``bbox_2d`` JSON in absolute pixels of the *resized* input (Qwen2.5-VL's
smart_resize to multiples of 28). Real outputs stray from that shape: no answer tags, fenced JSON, a single object,
bare ``[x1, y1, x2, y2]`` lists, Qwen2-VL's ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` on a 0-1000 scale, swapped
corners, an answer cut by the token budget. :func:`parse_reasoning` takes any of them and never raises on text:
what it cannot read is the answer's raw text with no boxes (``well_formed`` False).

Family-independent: a family's ``parse`` calls :func:`parse_reasoning` on the answer text and :func:`map_boxes` with
the size its preprocessing resized the image to (``resized_hw``) and the image's own size (``original_hw``).

Runtime module: the stdlib only (Python 3.10).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rsedge.runtime.families.qwen2_5_vl_image import smart_resize as qwen_smart_resize

BoxXYXY = tuple[float, float, float, float]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
# Box scales: absolute pixels of the model's (resized) input, or Qwen2-VL's 0-1000 of its width / height.
PIXELS, NORM_1000 = "pixels", "norm1000"
BOX_KEYS = ("bbox_2d", "bbox", "box")  # bbox_2d is Qwen2.5-VL's; the others appear in fine-tuned grounders
LABEL_KEYS = ("label", "category", "name")

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)(?:```|$)", re.DOTALL)
_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_BARE_BOX = re.compile(rf"\[\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*,\s*({_NUM})\s*\]")
# Qwen2-VL: <|object_ref_start|>the tank<|object_ref_end|><|box_start|>(120,340),(260,480)<|box_end|>
_QWEN2_BOX = re.compile(
    rf"(?:<\|object_ref_start\|>(.*?)<\|object_ref_end\|>\s*)?<\|box_start\|>\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)"
    rf"\s*,\s*\(\s*({_NUM})\s*,\s*({_NUM})\s*\)\s*<\|box_end\|>",
    re.DOTALL,
)
# JSON nested deeper than this is not an answer (and would hit json's recursion limit).
_MAX_JSON_DEPTH = 64
# Failed decode attempts per text before giving up on JSON (each may scan to the end: runaway "[1,[1,[1,..." output
# would otherwise cost quadratic time); the bare-list pattern still reads what is left.
_MAX_JSON_TRIES = 64


@dataclass(frozen=True)
class Reasoning:
    """One answer, read. ``boxes`` are ``(x1, y1, x2, y2)`` with x1 <= x2 and y1 <= y2, on ``box_scale``: absolute
    pixels of the model's resized input (``"pixels"``) or 0-1000 (``"norm1000"``, Qwen2-VL box tokens);
    ``labels[i]`` is box i's label or None. ``well_formed``: the tags are all there, closed, and nothing but
    whitespace lies outside them."""

    reasoning: str | None
    answer: str
    boxes: list[BoxXYXY] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    raw: str = ""
    well_formed: bool = False
    box_scale: str = PIXELS

    @property
    def tagged(self) -> bool:
        """Whether the text had a think or answer block at all (a plain answer has neither)."""
        return self.reasoning is not None or ANSWER_OPEN in self.raw


def parse_reasoning(text: str, prompt_open: bool = False) -> Reasoning:
    """Split ``text`` into reasoning and answer and read the answer's boxes; never raises on any string.

    ``prompt_open``: the prompt ended with ``<think>`` (its template opened the block), so the text starts inside
    the reasoning. A text cut inside its reasoning (no answer yet) has the raw text as its answer and no boxes:
    numbers the model was still reasoning about are not its answer."""
    opened = prompt_open and THINK_OPEN not in text and THINK_CLOSE not in text
    reasoning, answer, well_formed = _split(THINK_OPEN + text if opened else text)
    if answer is None:
        return Reasoning(reasoning, text.strip(), [], [], text, False, PIXELS)
    boxes, labels, scale = parse_answer_boxes(answer)
    return Reasoning(reasoning, answer, boxes, labels, text, well_formed, scale)


def _split(text: str) -> tuple[str | None, str | None, bool]:
    """(reasoning, answer, well_formed) of the raw text; answer None when the text ends inside its reasoning."""
    reasoning: str | None = None
    think_ok = True
    rest = text
    think = _THINK.search(text)
    if think is not None:
        reasoning = think.group(1).strip()
        think_ok = not text[: think.start()].strip()
        rest = text[think.end() :]
    elif THINK_CLOSE in text:  # the prompt opened the block: the text starts inside it
        before, _, rest = text.partition(THINK_CLOSE)
        reasoning = before.replace(THINK_OPEN, "").strip()
    elif THINK_OPEN in text:
        before, _, after = text.partition(THINK_OPEN)
        if ANSWER_OPEN not in after:  # cut inside its reasoning (the budget, max_new_tokens)
            return after.strip(), None, False
        thought, _, tail = after.partition(ANSWER_OPEN)  # the model answered without closing its think
        reasoning, rest, think_ok = thought.strip(), ANSWER_OPEN + tail, False
    answer = _ANSWER.search(rest)
    if answer is not None:
        outside = rest[: answer.start()] + rest[answer.end() :]
        return reasoning, answer.group(1).strip(), think_ok and not outside.strip()
    if ANSWER_OPEN in rest:  # an answer cut before its closing tag
        return reasoning, rest.partition(ANSWER_OPEN)[2].strip(), False
    return reasoning, rest.strip(), False


def parse_answer_boxes(answer: str) -> tuple[list[BoxXYXY], list[str | None], str]:
    """(boxes, labels, scale) of an answer's text: Qwen2-VL box tokens, else JSON, else bare 4-number lists."""
    found = _QWEN2_BOX.findall(answer)
    if found:
        boxes, labels = [], []
        for label, *coords in found:
            box = _box(coords)
            if box is not None:
                boxes.append(box)
                labels.append(label.strip() or None)
        return boxes, labels, NORM_1000
    parsed = _json_boxes(answer)
    if parsed is not None and parsed[0]:
        return parsed[0], parsed[1], PIXELS
    boxes = [b for b in (_box(m) for m in _BARE_BOX.findall(answer)) if b is not None]
    return boxes, [None] * len(boxes), PIXELS


def _box(values: Sequence[Any]) -> BoxXYXY | None:
    """Four finite numbers as an ordered box (swapped corners put right), or None."""
    if len(values) != 4:
        return None
    nums = []
    for v in values:
        if isinstance(v, bool):
            return None
        try:
            f = float(v)
        except (TypeError, ValueError):
            return None
        if not math.isfinite(f):
            return None
        nums.append(f)
    x1, y1, x2, y2 = nums
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def _json_values(answer: str) -> list[Any]:
    """Every JSON value the answer holds: fenced blocks first, else each top-level value found scanning the text."""
    texts = [m.group(1) for m in _FENCE.finditer(answer)] if "```" in answer else [answer]
    decoder = json.JSONDecoder()
    values: list[Any] = []
    for chunk in texts:
        pos, tries = 0, 0
        while tries < _MAX_JSON_TRIES:
            starts = [i for i in (chunk.find("[", pos), chunk.find("{", pos)) if i >= 0]
            if not starts:
                break
            start = min(starts)
            if _depth(chunk, start) > _MAX_JSON_DEPTH:
                break
            try:
                value, end = decoder.raw_decode(chunk, start)
            except (ValueError, RecursionError):
                pos, tries = start + 1, tries + 1
                continue
            values.append(value)
            pos = end
    return values


def _depth(text: str, start: int) -> int:
    """Leading nesting depth of brackets at ``start``: guards json against "[[[[..." recursion."""
    depth = 0
    for ch in text[start : start + _MAX_JSON_DEPTH + 2]:
        if ch in "[{":
            depth += 1
        elif not ch.isspace():
            break
    return depth


def _json_boxes(answer: str) -> tuple[list[BoxXYXY], list[str | None]] | None:
    """Boxes of the answer's JSON: objects with bbox_2d (a list of them, or one), a 4-number list, a list of them."""
    boxes: list[BoxXYXY] = []
    labels: list[str | None] = []
    values = _json_values(answer)
    if not values:
        return None
    for value in values:
        for box, label in _boxes_of(value):
            boxes.append(box)
            labels.append(label)
    return boxes, labels


def _boxes_of(value: Any) -> list[tuple[BoxXYXY, str | None]]:
    if isinstance(value, dict):
        for key in BOX_KEYS:
            if key in value:
                box = _box(value[key]) if isinstance(value[key], list) else None
                if box is None:
                    return []
                label = next((value[k] for k in LABEL_KEYS if isinstance(value.get(k), str)), None)
                return [(box, label)]
        return []
    if isinstance(value, list):
        box = _box(value) if len(value) == 4 and not any(isinstance(v, list | dict) for v in value) else None
        if box is not None:
            return [(box, None)]
        out = []
        for item in value:
            if isinstance(item, dict | list):
                out.extend(_boxes_of(item))
        return out
    return []


# ------------------------------------------------------------------------------------------------ mapping


def map_box(
    box: Sequence[float], resized_hw: tuple[int, int], original_hw: tuple[int, int], scale: str = PIXELS
) -> BoxXYXY:
    """A box on the model's ``scale`` -> pixels of the original image (height, width), clipped to it.

    ``"pixels"``: absolute pixels of the resized input (Qwen2.5-VL), scaled by original / resized per axis;
    ``"norm1000"``: 0-1000 of the width / height (Qwen2-VL), independent of ``resized_hw``."""
    oh, ow = original_hw
    if scale == NORM_1000:
        fx, fy = ow / 1000.0, oh / 1000.0
    elif scale == PIXELS:
        rh, rw = resized_hw
        if rh <= 0 or rw <= 0:
            raise ValueError(f"resized size must be positive, got {resized_hw}")
        fx, fy = ow / rw, oh / rh
    else:
        raise ValueError(f"unknown box scale {scale!r} (pixels, norm1000)")
    x1, y1, x2, y2 = (float(v) for v in box)
    xs = sorted((min(max(x1 * fx, 0.0), ow), min(max(x2 * fx, 0.0), ow)))
    ys = sorted((min(max(y1 * fy, 0.0), oh), min(max(y2 * fy, 0.0), oh)))
    return xs[0], ys[0], xs[1], ys[1]


def map_boxes(parsed: Reasoning, resized_hw: tuple[int, int], original_hw: tuple[int, int]) -> list[BoxXYXY]:
    """Every box of ``parsed`` in pixels of the original image, clipped to it (same order as ``parsed.labels``)."""
    return [map_box(b, resized_hw, original_hw, parsed.box_scale) for b in parsed.boxes]


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 14 * 14 * 4 * 16384
) -> tuple[int, int]:
    """Qwen2.5-VL's resized (height, width) with the processor's default bounds (a bundle's own values win): the
    family's own ``smart_resize``, here so a box can be mapped and a calibration answer written without a bundle."""
    return qwen_smart_resize(height, width, factor, min_pixels, max_pixels)
