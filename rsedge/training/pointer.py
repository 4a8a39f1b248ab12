"""Attention supervision for grounding, used only while training the demo model.

A box answer (`[VG]`) or a description of a given box (`[REF]`) needs the decoder to look up one
object among 64 visual tokens: a content-based pointer that a small model trained for an hour does
not discover from the answer text alone (its `[VG]` boxes followed the wording, not the image). So
heads of one layer are told where to look: while the answer is generated, their attention mass on the
object's visual tokens is pushed up (cross-entropy of that mass). The target is either every patch the
box covers or only the patch holding its centre, whose token carries the box (``training.dense``).

Looking is not reading: one head's 64-dimensional value path was too narrow to carry the box to the
digits, and the read-out is slow to learn while the pointer still misses. So the supervised heads can
also be *steered* (attention teacher forcing): their weights at answer positions are blended towards the
target token with a weight annealed to 0, so the read-out learns from a clean lookup early and from the
model's own attention by the end. Nothing is added to the model: the checkpoint and architecture are
unchanged, and inference never steers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward, repeat_kv

from rsedge.runtime.prompt import IMAGE_TOKEN_INDEX
from rsedge.training.dense import IGNORE, centre_patch

POINTER_TASKS = ("vg", "ref")
_ATTENTION = "rsedge_pointer"  # eager attention that can report and steer one layer's weights


@dataclass(frozen=True)
class PointerTarget:
    row: int  # batch row
    image_start: int  # sequence position of the row's first visual token
    patches: tuple[int, ...]  # visual token indices the object covers
    centre: int = -1  # visual token index of the patch holding the object's centre

    def keys(self, centre_only: bool) -> tuple[int, ...]:
        return (self.centre,) if centre_only else self.patches


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
            start = list(ids).index(IMAGE_TOKEN_INDEX)
            centre = centre_patch(s.meta["box_px"], s.scenes[0].size, grid)
            out.append(PointerTarget(row, start, box_patches(s.meta["box"], grid), centre))
    return out


@dataclass
class Steering:
    """Blend ``heads``' attention at ``rows`` [B, L] (bool) towards key ``keys`` [B] by ``alpha``."""

    heads: tuple[int, ...]
    rows: torch.Tensor
    keys: torch.Tensor
    alpha: float


def steering(targets: Sequence[PointerTarget], labels: torch.Tensor, heads: Sequence[int], alpha: float) -> Steering:
    """Steer every answer position of each target row towards the target's centre token."""
    rows = torch.zeros(labels.shape, dtype=torch.bool)
    keys = torch.zeros(labels.shape[0], dtype=torch.long)
    for t in targets:
        rows[t.row, (labels[t.row] != IGNORE).nonzero().flatten() - 1] = True
        keys[t.row] = t.image_start + t.centre
    return Steering(tuple(heads), rows, keys, alpha)


_JOB: dict = {}


def _pointer_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    out, weights = eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    if not _JOB or module.layer_idx != _JOB["layer"]:
        return out, weights
    _JOB["kept"].append(weights)
    steer: Steering | None = _JOB["steer"]
    if steer is None or steer.alpha <= 0:
        return out, weights
    heads = list(steer.heads)
    onehot = torch.zeros(weights.shape[0], weights.shape[-1], dtype=weights.dtype)
    onehot[torch.arange(weights.shape[0]), steer.keys] = 1.0
    blended = (1 - steer.alpha) * weights[:, heads] + steer.alpha * onehot[:, None, None, :]
    steered = weights.clone()
    steered[:, heads] = torch.where(steer.rows[:, None, :, None], blended, weights[:, heads])
    values = repeat_kv(value, module.num_key_value_groups)
    return torch.matmul(steered, values).transpose(1, 2).contiguous(), weights


AttentionInterface.register(_ATTENTION, _pointer_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(_ATTENTION, eager_mask)  # causal + padding, as eager attention


@contextmanager
def capture_attention(model, layer: int, steer: Steering | None = None) -> Iterator[list[torch.Tensor]]:
    """Run the decoder with eager attention, keep ``layer``'s weights [B, heads, L, L], optionally steered."""
    before = model.lm.config._attn_implementation
    model.lm.config._attn_implementation = _ATTENTION  # sdpa does not return the weights
    kept: list[torch.Tensor] = []
    _JOB.update(layer=layer, kept=kept, steer=steer)
    try:
        yield kept
    finally:
        _JOB.clear()
        model.lm.config._attn_implementation = before


def pointer_loss(
    weights: torch.Tensor,
    labels: torch.Tensor,
    targets: Sequence[PointerTarget],
    heads: Sequence[int] = (0,),
    centre_only: bool = False,
) -> torch.Tensor:
    """Mean -log(attention mass on the object's visual tokens) over answer positions, targets and heads.

    ``weights`` [B, heads, L, L]; the query is the position that predicts each answer token.
    """
    losses = []
    for t in targets:
        answer = (labels[t.row] != IGNORE).nonzero().flatten()
        queries = answer - 1
        keys = torch.tensor([t.image_start + p for p in t.keys(centre_only)])
        for h in heads:
            mass = weights[t.row, h][queries][:, keys].sum(-1)
            losses.append(-torch.log(mass.clamp_min(1e-6)).mean())
    return torch.stack(losses).mean()
