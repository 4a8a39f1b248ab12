"""Attention supervision for grounding, used only while training the demo model.

A box answer (`[VG]`) or a description of a given box (`[REF]`) needs the decoder to look up one
object among 64 visual tokens: a content-based pointer that a small model trained for an hour does
not discover from the answer text alone (its `[VG]` boxes followed the wording, not the image). So
one attention head of one layer is told where to look: while the answer is generated, its attention
mass on the visual tokens of the patches the object's box covers is pushed up (cross-entropy of that
mass). The visual tokens carry the box itself (``training.dense``), so the head's output is what the
digits need. Nothing is added to the model: the checkpoint and the architecture are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from rsedge.runtime.prompt import IMAGE_TOKEN_INDEX
from rsedge.training.dense import IGNORE

POINTER_TASKS = ("vg", "ref")


@dataclass(frozen=True)
class PointerTarget:
    row: int  # batch row
    image_start: int  # sequence position of the row's first visual token
    patches: tuple[int, ...]  # visual token indices the object covers


def box_patches(box_0_100: Sequence[float], grid: int) -> tuple[int, ...]:
    """Raster indices of the grid x grid patches a 0-100 box overlaps."""
    x1, y1, x2, y2 = (min(max(float(v), 0.0), 100.0) / 100 * grid for v in box_0_100)
    c1, r1 = min(grid - 1, int(x1)), min(grid - 1, int(y1))
    c2 = min(grid - 1, max(c1, int(x2 - 1e-6)))  # a box ending on a patch border does not enter the next
    r2 = min(grid - 1, max(r1, int(y2 - 1e-6)))
    return tuple(r * grid + c for r in range(r1, r2 + 1) for c in range(c1, c2 + 1))


def pointer_targets(samples: Sequence, input_ids: Sequence[Sequence[int]], grid: int) -> list[PointerTarget]:
    """Targets for the batch's synthetic [VG]/[REF] rows (single image; the image's box in meta)."""
    out = []
    for row, (s, ids) in enumerate(zip(samples, input_ids, strict=True)):
        if s.task in POINTER_TASKS and s.scenes and len(s.images) == 1 and "box" in s.meta:
            out.append(PointerTarget(row, list(ids).index(IMAGE_TOKEN_INDEX), box_patches(s.meta["box"], grid)))
    return out


@contextmanager
def capture_attention(model, layer: int):
    """Run the decoder with eager attention and keep ``layer``'s attention weights [B, heads, L, L]."""
    kept: list[torch.Tensor] = []
    attn = model.lm.model.layers[layer].self_attn
    handle = attn.register_forward_hook(lambda mod, args, out: kept.append(out[1]))
    before = model.lm.config._attn_implementation
    model.lm.config._attn_implementation = "eager"  # sdpa does not return the weights
    try:
        yield kept
    finally:
        handle.remove()
        model.lm.config._attn_implementation = before


def pointer_loss(
    weights: torch.Tensor, labels: torch.Tensor, targets: Sequence[PointerTarget], head: int = 0
) -> torch.Tensor:
    """Mean -log(attention mass on the object's visual tokens) over every answer position of every target.

    ``weights`` [B, heads, L, L]; the query is the position that predicts each answer token.
    """
    losses = []
    for t in targets:
        answer = (labels[t.row] != IGNORE).nonzero().flatten()
        queries = answer - 1
        keys = torch.tensor([t.image_start + p for p in t.patches])
        mass = weights[t.row, head][queries][:, keys].sum(-1)
        losses.append(-torch.log(mass.clamp_min(1e-6)).mean())
    return torch.stack(losses).mean()
