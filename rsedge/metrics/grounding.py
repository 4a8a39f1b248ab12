"""Visual grounding: box IoU, Acc@0.5 and mean IoU on [VG] answers (boxes on the model's 0-100 scale) and on
grounding-with-reasoning answers (boxes in pixels of the resized input, scored in original pixels), and the length of
the reasoning."""

from __future__ import annotations

from collections.abc import Sequence

from rsedge.runtime.outputs import Box, parse_boxes
from rsedge.runtime.reasoning import map_boxes, parse_reasoning


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


def mean_iou(predictions: Sequence[str], targets: Sequence[Sequence[float]]) -> float:
    """Mean IoU of each [VG] answer's first box with its target (0-100 scale); an answer without a box scores 0.

    Acc@0.5 counts hits; mean IoU also sees a box that drifted but still hits (quantization moves boxes first)."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    return box_scores([first_box(a) for a in predictions], targets)["miou"]


def box_scores(
    boxes: Sequence[Sequence[float] | None], targets: Sequence[Sequence[float]], threshold: float = 0.5
) -> dict[str, float]:
    """``acc@0.5`` (at ``threshold``) and ``miou`` of already-read boxes (one per answer, None for an answer without
    one: a miss, IoU 0) against targets on the same scale: e.g. reasoning answers mapped to original pixels."""
    if len(boxes) != len(targets):
        raise ValueError(f"{len(boxes)} boxes for {len(targets)} targets")
    if not boxes:
        raise ValueError("no samples to score")
    ious = [0.0 if b is None else box_iou(b, t) for b, t in zip(boxes, targets, strict=True)]
    key = f"acc@{threshold:g}"
    return {key: sum(i >= threshold for i in ious) / len(ious), "miou": sum(ious) / len(ious)}


def reasoning_grounding_scores(
    answers: Sequence[str],
    targets: Sequence[Sequence[float]],
    resized_hw: Sequence[tuple[int, int]],
    original_hw: Sequence[tuple[int, int]],
    threshold: float = 0.5,
) -> dict[str, float]:
    """Grounding-with-reasoning answers (``<think>..</think><answer>..</answer>``, boxes in pixels of the resized
    input) against targets in original pixels: each answer's first box mapped back, then ``box_scores``; plus
    ``well_formed``, the share of answers in the trained shape (a quantized model that breaks format shows here)."""
    if not len(answers) == len(resized_hw) == len(original_hw):
        raise ValueError(f"{len(answers)} answers for {len(resized_hw)} resized and {len(original_hw)} original sizes")
    parsed = [parse_reasoning(a) for a in answers]
    firsts = []
    for p, rs, og in zip(parsed, resized_hw, original_hw, strict=True):
        mapped = map_boxes(p, rs, og)
        firsts.append(list(mapped[0]) if mapped else None)
    out = box_scores(firsts, targets, threshold)
    out["well_formed"] = sum(p.well_formed for p in parsed) / len(parsed)
    return out


def reasoning_length(think_tokens: Sequence[int | None]) -> dict[str, float] | None:
    """Tokens inside the think block per answer (None: the answer had none): mean, median, max over the answers
    that reasoned, and how many did. None when no answer reasoned, so reports show the columns only where they mean
    something. A recipe that makes a model think twice as long doubles its decode time however fast each token is."""
    counts = sorted(int(n) for n in think_tokens if n is not None)
    if not counts:
        return None
    mid = len(counts) // 2
    median = counts[mid] if len(counts) % 2 else (counts[mid - 1] + counts[mid]) / 2
    return {
        "answers": len(counts),
        "of": len(think_tokens),
        "mean": sum(counts) / len(counts),
        "median": float(median),
        "max": counts[-1],
    }
