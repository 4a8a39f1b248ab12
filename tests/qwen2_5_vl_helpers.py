"""Shared pieces of the Qwen2.5-VL tests: the tiny checkpoint and transformers' model on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rsedge.models.qwen2_5_vl.checkpoint import make_checkpoint
from rsedge.models.qwen2_5_vl.modeling import Qwen25VLReference


def tiny_checkpoint(root: Path, seed: int = 0) -> Path:
    return make_checkpoint(root / f"qwen2_5_vl-tiny-{seed}", size="tiny", seed=seed)


def reference(path: Path) -> Qwen25VLReference:
    return Qwen25VLReference.from_checkpoint(path)


@torch.no_grad()
def reference_logits(ref: Qwen25VLReference, embeds: np.ndarray, rope_positions: np.ndarray) -> np.ndarray:
    """transformers' logits [T, V] of a whole sequence of embeddings at the given [3, T] rotary positions."""
    out = ref.model(inputs_embeds=torch.from_numpy(embeds), position_ids=torch.from_numpy(rope_positions)[:, None])
    return out.logits[0].float().numpy()
