"""Dense auxiliary supervision of the visual tokens, used only while training the demo model.

RSUniVLM starts from a pretrained SigLIP tower; the demo model has none, and its tower learns nothing
about *where* things are from the answer text alone (its grounding boxes landed in the named region
but not on the object). So each visual token (the connector's output, exactly what the decoder reads)
is also trained to say what its patch holds: the label of every sub-cell of the patch, and, for the
object centred in it, its class, colour and 0-100 box, as coordinate bins. This is the role detection
pretraining plays for a real tower. The heads are dropped when the checkpoint is written: the released
layout and the architecture are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rsedge.synth.scenes import COLOURS, LABELS, OBJECT_CLASSES, Scene

SUB = 4  # sub-cells per patch side whose label each token predicts
COORD_BINS = 101  # box coordinates are integers 0..100, as in the answers
IGNORE = -100
_COLOUR_INDEX = {c: i for i, c in enumerate(COLOURS)}
_CLASS_INDEX = {c: i + 1 for i, c in enumerate(OBJECT_CLASSES)}  # 0 = no object centred here


@dataclass
class DenseTarget:
    """Per-token targets of one image on a grid x grid patch layout (raster order, as the tower emits)."""

    labels: np.ndarray  # [grid*grid, SUB*SUB] int64, indices into LABELS
    objects: np.ndarray  # [grid*grid, 6] int64: class (0 = none), colour, x1, y1, x2, y2 (IGNORE if none)


def centre_patch(box_px: Sequence[float], size: int, grid: int) -> int:
    """Raster index of the patch holding a pixel box's centre: the patch that speaks for the object."""
    cx, cy = (box_px[0] + box_px[2]) / 2, (box_px[1] + box_px[3]) / 2
    return min(grid - 1, int(cy / size * grid)) * grid + min(grid - 1, int(cx / size * grid))


def dense_target(scene: Scene, grid: int) -> DenseTarget:
    """What each of the grid x grid patches of ``scene`` holds."""
    side = grid * SUB
    centres = ((np.arange(side) + 0.5) * scene.size / side).astype(int)
    cells = scene.mask[np.ix_(centres, centres)]  # [side, side]
    labels = cells.reshape(grid, SUB, grid, SUB).transpose(0, 2, 1, 3).reshape(grid * grid, SUB * SUB)
    objects = np.full((grid * grid, 6), IGNORE, np.int64)
    objects[:, 0] = 0
    best = np.zeros(grid * grid)
    for o in scene.objects:
        t = centre_patch(o.box, scene.size, grid)
        if o.area <= best[t]:  # several centres in one patch: the largest object speaks for it
            continue
        best[t] = o.area
        box = np.clip(np.floor(np.asarray(o.box, float) / scene.size * 100 + 0.5), 0, 100)
        objects[t] = [_CLASS_INDEX[o.cls], _COLOUR_INDEX[o.colour], *box.astype(np.int64)]
    return DenseTarget(labels.astype(np.int64), objects)


def batch_targets(samples: Sequence, grid: int) -> list[DenseTarget | None]:
    """One entry per image of the batch, in prompt order; None where a sample carries no scene (real data)."""
    out: list[DenseTarget | None] = []
    for s in samples:
        if s.scenes:
            out.extend(dense_target(sc, grid) for sc in s.scenes)
        else:
            out.extend([None] * len(s.images))
    return out


class DenseHeads(nn.Module):
    """Linear read-outs of the visual tokens: sub-cell labels and the centred object's class/colour/box."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.labels = nn.Linear(hidden, SUB * SUB * len(LABELS))
        self.objects = nn.Linear(hidden, 1 + len(OBJECT_CLASSES) + len(COLOURS) + 4 * COORD_BINS)

    def loss(self, feats: torch.Tensor, targets: Sequence[DenseTarget | None]) -> torch.Tensor | None:
        """Mean cross-entropy of every head over the images that have targets; feats [N, T, H]."""
        keep = [i for i, t in enumerate(targets) if t is not None]
        if not keep:
            return None
        x = feats[keep]  # [n, T, H]
        labels = torch.from_numpy(np.stack([targets[i].labels for i in keep]))  # [n, T, SUB*SUB]
        objects = torch.from_numpy(np.stack([targets[i].objects for i in keep]))  # [n, T, 6]
        n_cls, n_col = 1 + len(OBJECT_CLASSES), len(COLOURS)
        seg = self.labels(x).reshape(*labels.shape, len(LABELS))
        obj = self.objects(x)
        cls_logits = obj[..., :n_cls]
        col_logits = obj[..., n_cls : n_cls + n_col]
        box_logits = obj[..., n_cls + n_col :].reshape(*obj.shape[:2], 4, COORD_BINS)
        loss = F.cross_entropy(seg.reshape(-1, len(LABELS)), labels.reshape(-1))
        loss = loss + F.cross_entropy(cls_logits.reshape(-1, n_cls), objects[..., 0].reshape(-1))
        if bool((objects[..., 1] != IGNORE).any()):
            loss = loss + F.cross_entropy(col_logits.reshape(-1, n_col), objects[..., 1].reshape(-1))
            loss = loss + F.cross_entropy(box_logits.reshape(-1, COORD_BINS), objects[..., 2:].reshape(-1))
        return loss
