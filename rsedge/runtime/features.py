"""Turn projected vision features into the visual tokens spliced into the prompt (numpy).

Mirrors LLaVA-NeXT's ``prepare_inputs_labels_for_multimodal`` for ``mm_patch_merge_type`` =
``spatial_unpad``:

- one view per image (``square``): the T tokens, then one ``image_newline``;
- base + tiles (``anyres`` / ``anyres_max_N``): tiles are stitched into one feature map, the black
  padding is cut off again (``unpad``), the map is shrunk bilinearly when it has far more than
  N tiles' worth of tokens (anyres_max only), a newline is appended to every row, and the base
  view's T tokens (no newline) go in front.

The PyTorch twin is ``rsedge.models.rsunivlm.merge``; both share the shape arithmetic below.

Runtime module: numpy, Pillow and the stdlib only.
"""

from __future__ import annotations

import math
import re

import numpy as np

from rsedge.runtime.preprocess import Pinpoints, anyres_grid_shape

# A half-open [start, stop) range of rows or columns.
Span = tuple[int, int]

# LLaVA only downsamples when the stitched map exceeds the token budget by more than this factor.
DOWNSAMPLE_THRESHOLD = 1.1


def parse_max_patches(image_aspect_ratio: str) -> int | None:
    """N from ``anyres_max_N``; None for plain ``anyres`` (no downsampling) and other modes."""
    match = re.match(r"anyres_max_(\d+)", image_aspect_ratio)
    return int(match.group(1)) if match else None


def tokens_per_side(num_tokens: int) -> int:
    """Side of the square token grid of one view (27 for SigLIP-384/14)."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"a view has {num_tokens} tokens, which is not a square grid")
    return side


def unpad_bounds(height: int, width: int, image_size_wh: tuple[int, int]) -> tuple[Span, Span]:
    """Rows [r0, r1) and columns [c0, c1) of a stitched map that hold the image, not the padding.

    LLaVA's arithmetic: int() truncation of the scaled side (HF transformers rounds instead), and the
    same padding removed from both ends, so an odd remainder keeps one padded row/column.
    """
    orig_w, orig_h = image_size_wh
    if orig_w / orig_h > width / height:
        new_h = int(orig_h * (width / orig_w))
        pad = (height - new_h) // 2
        return (pad, height - pad), (0, width)
    new_w = int(orig_w * (height / orig_h))
    pad = (width - new_w) // 2
    return (0, height), (pad, width - pad)


def downsample_size(height: int, width: int, max_patches: int | None, unit: int) -> tuple[int, int] | None:
    """Target (h, w) of anyres_max's bilinear shrink, or None when the map is kept as is."""
    if max_patches is None:
        return None
    times = math.sqrt(height * width / (max_patches * unit**2))
    if times <= DOWNSAMPLE_THRESHOLD:
        return None
    # Float floor division, as upstream writes it (h // times), then int().
    return int(height // times), int(width // times)


def anyres_map_shape(
    image_size_wh: tuple[int, int],
    pinpoints: Pinpoints,
    tile_size: int,
    unit: int,
    max_patches: int | None,
) -> tuple[int, int]:
    """(rows, cols) of the tile feature map after unpad and any downsampling (before newlines)."""
    num_w, num_h = anyres_grid_shape(image_size_wh, pinpoints, tile_size)
    (r0, r1), (c0, c1) = unpad_bounds(num_h * unit, num_w * unit, image_size_wh)
    rows, cols = r1 - r0, c1 - c0
    return downsample_size(rows, cols, max_patches, unit) or (rows, cols)


def square_token_count(num_tokens: int) -> int:
    """Visual tokens of one image on the square path: T + one newline (730 for RSUniVLM)."""
    return num_tokens + 1


def anyres_token_count(
    image_size_wh: tuple[int, int],
    pinpoints: Pinpoints,
    tile_size: int,
    num_tokens: int,
    max_patches: int | None,
) -> int:
    """Visual tokens of one image on the anyres path: base T + rows * (cols + 1)."""
    unit = tokens_per_side(num_tokens)
    rows, cols = anyres_map_shape(image_size_wh, pinpoints, tile_size, unit, max_patches)
    return num_tokens + rows * (cols + 1)


def visual_token_count(
    image_size_wh: tuple[int, int],
    image_aspect_ratio: str = "square",
    pinpoints: Pinpoints | None = None,
    tile_size: int = 384,
    num_tokens: int = 729,
) -> int:
    """Visual tokens one image adds to the prompt, from the config's ``image_aspect_ratio``."""
    if image_aspect_ratio == "anyres" or "anyres_max" in image_aspect_ratio:
        if pinpoints is None:
            raise ValueError(f"image_aspect_ratio {image_aspect_ratio!r} needs grid pinpoints")
        max_patches = parse_max_patches(image_aspect_ratio)
        return anyres_token_count(image_size_wh, pinpoints, tile_size, num_tokens, max_patches)
    return square_token_count(num_tokens)


def merge_square(features: np.ndarray, newline: np.ndarray) -> np.ndarray:
    """[1, T, H] features of one view -> [T + 1, H] with the image_newline appended."""
    if features.ndim != 3 or features.shape[0] != 1:
        raise ValueError(f"expected features of shape [1, T, H], got {list(features.shape)}")
    return np.concatenate([features[0], newline.reshape(1, -1).astype(features.dtype)], axis=0)


def _bilinear_resize(fmap: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize a [h, w, C] map like torch interpolate(mode="bilinear", align_corners=False)."""

    def axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # Half-pixel centres, source index clamped at 0, upper neighbour clamped at the edge;
        # the scale is in/out because torch gets an explicit size, not a scale factor.
        scale = in_size / out_size
        src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
        hi = np.minimum(lo + 1, in_size - 1)
        frac = np.clip(src - lo, 0.0, 1.0)
        return lo, hi, frac

    h_lo, h_hi, h_frac = axis_weights(fmap.shape[0], out_h)
    w_lo, w_hi, w_frac = axis_weights(fmap.shape[1], out_w)
    work = fmap.astype(np.float64)
    rows = work[h_lo] * (1.0 - h_frac)[:, None, None] + work[h_hi] * h_frac[:, None, None]
    out = rows[:, w_lo] * (1.0 - w_frac)[None, :, None] + rows[:, w_hi] * w_frac[None, :, None]
    return out.astype(fmap.dtype)


def merge_anyres(
    features: np.ndarray,
    newline: np.ndarray,
    image_size_wh: tuple[int, int],
    pinpoints: Pinpoints,
    tile_size: int,
    max_patches: int | None,
) -> np.ndarray:
    """[1 + n, T, H] features (base view, then tiles row-major) -> [N, H] visual tokens.

    ``max_patches`` is N of ``anyres_max_N``; None gives plain ``anyres`` (unpad, no downsampling).
    """
    if features.ndim != 3 or features.shape[0] < 2:
        raise ValueError(f"expected features of shape [1 + n, T, H] with n >= 1, got {list(features.shape)}")
    views, num_tokens, hidden = features.shape
    unit = tokens_per_side(num_tokens)
    num_w, num_h = anyres_grid_shape(image_size_wh, pinpoints, tile_size)
    if views - 1 != num_w * num_h:
        size = f"{image_size_wh[0]}x{image_size_wh[1]}"
        raise ValueError(f"got {views - 1} tiles but the grid for a {size} image is {num_w}x{num_h}")
    # Stitch channel-last, (nh, nw, h, w, C) -> (nh*h, nw*w, C): the same element order as upstream's
    # permute to (C, nh*h, nw*w), without moving the hidden axis.
    fmap = features[1:].reshape(num_h, num_w, unit, unit, hidden).transpose(0, 2, 1, 3, 4)
    fmap = fmap.reshape(num_h * unit, num_w * unit, hidden)
    (r0, r1), (c0, c1) = unpad_bounds(fmap.shape[0], fmap.shape[1], image_size_wh)
    fmap = fmap[r0:r1, c0:c1]
    target = downsample_size(fmap.shape[0], fmap.shape[1], max_patches, unit)
    if target is not None:
        fmap = _bilinear_resize(fmap, *target)
    rows = fmap.shape[0]
    newline_col = np.broadcast_to(newline.astype(fmap.dtype).reshape(1, 1, hidden), (rows, 1, hidden))
    tokens = np.concatenate([fmap, newline_col], axis=1).reshape(-1, hidden)
    return np.concatenate([features[0], tokens], axis=0)
