"""Task metrics for RSUniVLM answers (grounding Acc@0.5 / mean IoU, exact-match accuracy, mask IoU, BLEU-4 / CIDEr-D)
and for reasoning grounders (boxes mapped back from the resized input, reasoning length).

Pure Python plus numpy (and the answer parsers of ``rsedge.runtime.outputs``); no extra dependency.
"""

from rsedge.metrics.captions import bleu, bleu4, caption_scores, cider_d, cider_d_scores, tokenize_caption
from rsedge.metrics.grounding import (
    box_iou,
    box_scores,
    first_box,
    grounding_accuracy,
    mean_iou,
    reasoning_grounding_scores,
    reasoning_length,
)
from rsedge.metrics.segmentation import class_ious, class_miou, segmentation_iou, segmentation_miou, target_mask
from rsedge.metrics.tasks import TASKS, TaskReport
from rsedge.metrics.text import exact_match_accuracy, normalize_answer

__all__ = [
    "TASKS",
    "TaskReport",
    "bleu",
    "bleu4",
    "box_iou",
    "box_scores",
    "caption_scores",
    "cider_d",
    "cider_d_scores",
    "class_ious",
    "class_miou",
    "exact_match_accuracy",
    "first_box",
    "grounding_accuracy",
    "mean_iou",
    "normalize_answer",
    "reasoning_grounding_scores",
    "reasoning_length",
    "segmentation_iou",
    "segmentation_miou",
    "target_mask",
    "tokenize_caption",
]
