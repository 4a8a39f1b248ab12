"""Per-task metrics over a mixed set of RSUniVLM answers.

- "vg": target ``{"box": [x1, y1, x2, y2]}`` (0-100) -> ``acc@0.5`` (``grounding_accuracy``).
- "vgr" (grounding with reasoning, ``<think>..</think><answer>..</answer>``): target ``{"box": [x1, y1, x2, y2]}`` in
  original pixels, ``"resized_hw"`` and ``"original_hw"`` (the model's boxes are in resized-input pixels) ->
  ``acc@0.5``, ``miou`` and ``well_formed`` (``reasoning_grounding_scores``).
- "seg", "cseg": ``{"grid": np.ndarray, "labels": [...]}``, optionally ``"label"`` (the class to score;
  all non-"others" labels when absent) -> ``miou`` (per-sample mean) and ``class_miou`` (per class).
- "vqa", "cls", "video" (a clip's class): ``{"answer": str}`` -> ``accuracy`` (``exact_match_accuracy``).
- "cap", "ccd", "ref": ``{"references": [str, ...]}`` -> ``bleu4`` and ``cider`` (``caption_scores``).

"ref" (a region caption for a given box) and "ccd" (change captioning) are scored as captions; "cseg"
(change mask) as segmentation. Every task's dict also holds ``n``, its sample count.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from rsedge.metrics.captions import caption_scores
from rsedge.metrics.grounding import grounding_accuracy, reasoning_grounding_scores
from rsedge.metrics.segmentation import class_miou, segmentation_iou
from rsedge.metrics.text import exact_match_accuracy

GROUNDING_TASKS = ("vg",)
REASONING_GROUNDING_TASKS = ("vgr",)
SEGMENTATION_TASKS = ("seg", "cseg")
ANSWER_TASKS = ("vqa", "cls", "video")  # "video": a clip's class (UniRS)
CAPTION_TASKS = ("cap", "ccd", "ref")
TASKS = GROUNDING_TASKS + REASONING_GROUNDING_TASKS + SEGMENTATION_TASKS + ANSWER_TASKS + CAPTION_TASKS

_REQUIRED_KEYS = {
    **dict.fromkeys(GROUNDING_TASKS, ("box",)),
    **dict.fromkeys(REASONING_GROUNDING_TASKS, ("box", "resized_hw", "original_hw")),
    **dict.fromkeys(SEGMENTATION_TASKS, ("grid", "labels")),
    **dict.fromkeys(ANSWER_TASKS, ("answer",)),
    **dict.fromkeys(CAPTION_TASKS, ("references",)),
}


class TaskReport:
    """Collect ``(task, prediction, target)`` samples, then ``compute()`` metrics per task.

    >>> report = TaskReport([("vqa", "Three.", {"answer": "3"})])
    >>> report.compute()
    {'vqa': {'n': 1, 'accuracy': 1.0}}
    """

    def __init__(self, samples: Iterable[tuple[str, str, Mapping[str, Any]]] = ()) -> None:
        self._samples: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
        self.extend(samples)

    def add(self, task: str, prediction: str, target: Mapping[str, Any]) -> None:
        """Record one sample; checks the task name and the target's keys now, not at ``compute``."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
        if not isinstance(prediction, str):
            raise TypeError(f"prediction must be the answer text, got {type(prediction).__name__}")
        missing = [key for key in _REQUIRED_KEYS[task] if key not in target]
        if missing:
            raise ValueError(f"{task!r} target lacks {', '.join(missing)}")
        self._samples.setdefault(task, []).append((prediction, target))

    def extend(self, samples: Iterable[tuple[str, str, Mapping[str, Any]]]) -> None:
        for task, prediction, target in samples:
            self.add(task, prediction, target)

    def __len__(self) -> int:
        return sum(len(samples) for samples in self._samples.values())

    def compute(self) -> dict[str, dict[str, float]]:
        """Metrics of every task seen, in ``TASKS`` order: ``{task: {"n": count, metric: value, ...}}``."""
        return {task: self._score(task, self._samples[task]) for task in TASKS if task in self._samples}

    @staticmethod
    def _score(task: str, samples: list[tuple[str, Mapping[str, Any]]]) -> dict[str, float]:
        predictions = [prediction for prediction, _ in samples]
        targets = [target for _, target in samples]
        result: dict[str, float] = {"n": len(samples)}
        if task in GROUNDING_TASKS:
            result["acc@0.5"] = grounding_accuracy(predictions, [t["box"] for t in targets])
        elif task in REASONING_GROUNDING_TASKS:
            result.update(
                reasoning_grounding_scores(
                    predictions,
                    [t["box"] for t in targets],
                    [tuple(t["resized_hw"]) for t in targets],
                    [tuple(t["original_hw"]) for t in targets],
                )
            )
        elif task in SEGMENTATION_TASKS:
            ious = [
                segmentation_iou(p, t["grid"], t["labels"], t.get("label"))
                for p, t in zip(predictions, targets, strict=True)
            ]
            result["miou"] = float(np.mean(ious))
            result["class_miou"] = class_miou(predictions, [(t["grid"], t["labels"]) for t in targets])
        elif task in ANSWER_TASKS:
            result["accuracy"] = exact_match_accuracy(predictions, [t["answer"] for t in targets])
        else:
            result.update(caption_scores(predictions, [t["references"] for t in targets]))
        return result
