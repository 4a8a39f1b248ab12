"""Visual grounding: box IoU and Acc@0.5 on [VG] answers (boxes on the model's 0-100 scale)."""

from __future__ import annotations

from collections.abc import Sequence

from rsedge.runtime.outputs import Box, parse_boxes


def _as_xyxy(box: Box | Sequence[float]) -> tuple[float, float, float, float]:
    values = box.to_list() if isinstance(box, Box) else [float(v) for v in box]
    if len(values) != 4:
        raise ValueError(f"a box has 4 values (x1, y1, x2, y2), got {len(values)}")
    x1, y1, x2, y2 = values
    if x2 < x1 or y2 < y1:
        raise ValueError(f"expected x1 <= x2 and y1 <= y2, got {values}")
    return x1, y1, x2, y2


def box_iou(a: Box | Sequence[float], b: Box | Sequence[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes (any common scale).

    Boxes of zero area are allowed; when the union is empty the IoU is 0.
    """
    ax1, ay1, ax2, ay2 = _as_xyxy(a)
    bx1, by1, bx2, by2 = _as_xyxy(b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def first_box(answer: str) -> list[float] | None:
    """The first box of a [VG] answer on the 0-100 scale (clipped, corners ordered), or None."""
    boxes = parse_boxes(answer, 100, 100)
    return boxes[0].to_list() if boxes else None


def grounding_accuracy(predictions: Sequence[str], targets: Sequence[Sequence[float]], threshold: float = 0.5) -> float:
    """Acc@threshold: the fraction of answers whose first box has IoU >= ``threshold`` with the target.

    Predictions are raw answers, parsed with ``parse_boxes`` on the 0-100 scale; targets are
    ``[x1, y1, x2, y2]`` on the same 0-100 scale. An answer without a parsable box is a miss.
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    if not predictions:
        raise ValueError("no samples to score")
    hits = 0
    for answer, target in zip(predictions, targets, strict=True):
        box = first_box(answer)
        if box is not None and box_iou(box, target) >= threshold:
            hits += 1
    return hits / len(predictions)
