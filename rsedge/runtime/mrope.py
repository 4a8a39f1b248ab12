"""Qwen2-VL's multimodal rotary positions (mrope) for a spliced prompt, and their continuation while decoding.

Every token has three rotary positions: temporal, height, width. Text tokens have all three equal and
consecutive; an image's ``t x h x w`` merged tokens (``h``, ``w`` = the patch grid / ``spatial_merge_size``)
start where the text before them stopped, ``start + (t, row, column)``, and the text after the image resumes at
``start + max(h, w)``. So rotary positions run behind the cache slots: the gap is ``delta`` (<= 0), and a
decoded token at slot ``p`` has all three positions ``p + delta``.

A numpy port of transformers' ``Qwen2_5_VLModel.get_rope_index`` for images (transformers 5.24; rsedge feeds
no video), checked against it by ``tests/test_qwen2_5_vl_rope.py``.

Runtime module: numpy and the stdlib only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rsedge.errors import PromptError

ROPE_POSITION_IDS = "rope_position_ids"  # the decoder graph's input (rsedge.export.decoder_graph)


def merged_tokens(grid_thw: Sequence[int], spatial_merge_size: int) -> int:
    """Visual tokens an image of patch grid ``(t, h, w)`` takes in the prompt."""
    t, h, w = (int(v) for v in grid_thw)
    return t * (h // spatial_merge_size) * (w // spatial_merge_size)


def expand_image_tokens(ids: Sequence[int], counts: Sequence[int], image_token_id: int) -> list[int]:
    """``ids`` with the k-th ``image_token_id`` repeated ``counts[k]`` times (the processor's expansion)."""
    out: list[int] = []
    it = iter(counts)
    for tok in ids:
        out.extend([tok] * next(it) if tok == image_token_id else [tok])
    return out


def rope_index(
    input_ids: Sequence[int] | np.ndarray,
    image_grids: Sequence[Sequence[int]],
    image_token_id: int,
    spatial_merge_size: int,
) -> tuple[np.ndarray, int]:
    """Rotary positions [3, S] int64 of one expanded prompt (each image's tokens one run), and its delta.

    ``image_grids``: each image's ``(t, h, w)`` patch grid, in prompt order. A run whose length is not its
    grid's token count, or a count of runs other than of grids, is a PromptError.
    """
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    is_image = ids == image_token_id
    # runs of consecutive image / text tokens, as get_rope_index groups mm_token_type_ids
    edges = np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1
    starts = np.concatenate([[0], edges]).astype(np.int64)
    ends = np.concatenate([edges, [ids.size]]).astype(np.int64)
    grids = iter(image_grids)
    pieces: list[np.ndarray] = []
    current = 0
    used = 0
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        if end <= start:
            continue
        if not is_image[start]:
            pieces.append(np.broadcast_to(np.arange(end - start, dtype=np.int64) + current, (3, end - start)))
            current += end - start
            continue
        grid = next(grids, None)
        if grid is None:
            raise PromptError(f"the prompt has more image runs than the {len(image_grids)} image grids given")
        used += 1
        t, h, w = int(grid[0]), int(grid[1]) // spatial_merge_size, int(grid[2]) // spatial_merge_size
        if end - start != t * h * w:
            raise PromptError(f"image {used} has {end - start} tokens in the prompt, its grid {list(grid)} {t * h * w}")
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
        pieces.append(np.stack([tt, hh, ww]).reshape(3, -1).astype(np.int64) + current)
        current += max(h, w)
    if used != len(image_grids):
        raise PromptError(f"the prompt has {used} image runs for {len(image_grids)} image grids")
    positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), dtype=np.int64)
    delta = int(positions.max()) + 1 - ids.size if ids.size else 0
    return np.ascontiguousarray(positions), delta


class MropePositions:
    """One request's rotary positions as decoder inputs: ``(start, count)`` -> ``{rope_position_ids: [3, 1,
    count]}`` for the cache slots ``start .. start+count-1``, the prompt's from :func:`rope_index`, each later
    slot ``p`` at ``p + delta`` on all three axes (what transformers' generate feeds a decode step)."""

    def __init__(self, prompt_positions: np.ndarray, delta: int) -> None:
        self.prompt = prompt_positions
        self.delta = int(delta)

    def __call__(self, start: int, count: int) -> dict[str, np.ndarray]:
        n = self.prompt.shape[1]
        slots = np.arange(start, start + count, dtype=np.int64)
        out = np.broadcast_to(slots + self.delta, (3, count)).copy()
        inside = slots < n
        out[:, inside] = self.prompt[:, slots[inside]]
        return {ROPE_POSITION_IDS: out[:, None, :]}
