"""[SEG] / change-[SEG] masks: IoU of run-length answers against label grids.

Two common dataset-level definitions are provided:

- ``segmentation_miou``: per-sample foreground IoU, averaged over samples (what referring-segmentation
  papers often call mIoU or gIoU).
- ``class_miou``: intersection and union summed over the dataset per class, IoU per class, then averaged
  over classes (semantic-segmentation mIoU). With a single foreground class this is the cumulative IoU
  (cIoU), e.g. the change class of change detection.

A target is ``(grid, labels)``: a 2-D array of indices into ``labels``; the background label is
"others" (any case). Predictions are decoded with ``parse_rle_mask`` and compared on the target grid's
shape; a predicted grid of another shape is resized nearest-neighbour (``mask_for_image``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rsedge.runtime.outputs import BACKGROUND, RleMask, mask_for_image, parse_rle_mask

Target = tuple[np.ndarray, Sequence[str]]


def _check_grid(grid: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    grid = np.asarray(grid)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"expected a non-empty 2-D target grid, got shape {list(grid.shape)}")
    if not np.issubdtype(grid.dtype, np.integer):
        raise ValueError(f"target grid must hold integer label indices, got {grid.dtype}")
    if int(grid.min()) < 0 or int(grid.max()) >= len(labels):
        raise ValueError(f"target grid holds label indices outside 0..{len(labels) - 1}")
    return grid


def target_mask(grid: np.ndarray, labels: Sequence[str], label: str | None = None) -> np.ndarray:
    """Boolean mask of ``label`` in a target grid (all non-"others" labels when None).

    Label matching follows ``mask_for_image``: exact spelling first, else case-insensitive.
    """
    grid = _check_grid(grid, labels)
    if label is None:
        wanted = [i for i, name in enumerate(labels) if name.lower() != BACKGROUND]
    else:
        wanted = [i for i, name in enumerate(labels) if name == label]
        if not wanted:
            wanted = [i for i, name in enumerate(labels) if name.lower() == label.lower()]
    return np.isin(grid, wanted)


def _predicted_mask(rle: RleMask, shape: tuple[int, int], label: str | None) -> np.ndarray:
    height, width = shape
    return mask_for_image(rle, width, height, label)


def segmentation_iou(prediction: str, grid: np.ndarray, labels: Sequence[str], label: str | None = None) -> float:
    """IoU of one answer's mask with the target's (foreground when ``label`` is None).

    Empty prediction and empty target give 1.0; an answer with no parsable row gives 0.0.
    """
    truth = target_mask(grid, labels, label)
    rle = parse_rle_mask(prediction)
    if rle is None:
        return 0.0
    pred = _predicted_mask(rle, truth.shape, label)
    union = int(np.logical_or(pred, truth).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(pred, truth).sum()) / union


def segmentation_miou(predictions: Sequence[str], targets: Sequence[Target], label: str | None = None) -> float:
    """Per-sample mIoU: ``segmentation_iou`` of each sample, averaged over samples.

    Each sample weighs the same whatever its object size (the gIoU / per-image mIoU convention).
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    if not predictions:
        raise ValueError("no samples to score")
    ious = [segmentation_iou(p, grid, labels, label) for p, (grid, labels) in zip(predictions, targets, strict=True)]
    return float(np.mean(ious))


def class_ious(
    predictions: Sequence[str], targets: Sequence[Target], classes: Sequence[str] | None = None
) -> dict[str, float]:
    """Dataset-level IoU per class: sum of intersections over sum of unions across all samples.

    Class names compare case-insensitively and are reported lower-case. ``classes`` defaults to every
    non-"others" label listed in the targets; predicted labels outside it count as background. Pass
    "others" in ``classes`` to score the background too. Classes absent from both the targets and the
    predictions (union 0) are left out. An unparsable answer predicts nothing (all its target pixels
    are misses).
    """
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    if classes is None:
        names = {name.lower() for _, labels in targets for name in labels} - {BACKGROUND}
        classes = sorted(names)
    else:
        classes = list(dict.fromkeys(c.lower() for c in classes))
    inter = dict.fromkeys(classes, 0)
    union = dict.fromkeys(classes, 0)
    for prediction, (grid, labels) in zip(predictions, targets, strict=True):
        lowered = [name.lower() for name in labels]
        rle = parse_rle_mask(prediction)
        if rle is not None:
            # Lower-cased labels, so that every spelling of a class is selected, not only the first match.
            rle = RleMask(labels=[name.lower() for name in rle.labels], grid=rle.grid)
        for name in classes:
            truth = target_mask(grid, lowered, name)
            pred = np.zeros_like(truth) if rle is None else _predicted_mask(rle, truth.shape, name)
            inter[name] += int(np.logical_and(pred, truth).sum())
            union[name] += int(np.logical_or(pred, truth).sum())
    return {name: inter[name] / union[name] for name in classes if union[name] > 0}


def class_miou(predictions: Sequence[str], targets: Sequence[Target], classes: Sequence[str] | None = None) -> float:
    """Class mIoU: the mean over classes of ``class_ious`` (intersection and union summed per class over
    the dataset). With one foreground class this is the cumulative IoU (cIoU). 1.0 when no class occurs
    in either the targets or the predictions.
    """
    if not predictions:
        raise ValueError("no samples to score")
    ious = class_ious(predictions, targets, classes)
    return float(np.mean(list(ious.values()))) if ious else 1.0
