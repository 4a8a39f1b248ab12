"""Qwen2.5-VL's image side without torch: dynamic-resolution preprocessing and the vision graph's grid feeds.

``preprocess`` reproduces transformers' ``Qwen2VLImageProcessorPil`` (what ``AutoImageProcessor`` picks for
Qwen2.5-VL when torchvision is absent, and the processor the fast one was ported from): ``smart_resize`` to
multiples of ``patch_size * merge_size``, a Pillow resize of the 8-bit image (bicubic), rescale and normalise
with transformers' operation order (bit-identical values), and the patch layout
``[grid_h * grid_w, C * temporal * patch * patch]`` in merge-block order, the image repeated along time.

``vision_feeds`` computes everything that depends only on the image grid (the window permutation and its
inverse, the 2D rotary tables, the padded window table and each patch's frame), as onnxruntime-genai does for
Qwen2.5-VL, so the vision graph has no data-dependent control flow: its inputs are ``pixel_values`` plus these
arrays (``image_feeds`` makes them all for one image).

Runtime module: numpy, Pillow and the stdlib only (Python 3.10).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from rsedge.errors import BundleError, ImageError
from rsedge.runtime.preprocess import RESAMPLE, Normalization

# The vision graph's input and output names (the export side builds its graph with these).
PIXEL_VALUES = "pixel_values"
WINDOW_INDEX = "window_index"  # [N/unit] int64: merge units in window order (HF get_vision_window_index)
REVERSE_INDEX = "reverse_index"  # [N/unit] int64: argsort(window_index), back to the image's order
ROTARY_COS = "rotary_cos"  # [N, head_dim] float32, rows already in window order
ROTARY_SIN = "rotary_sin"
# Windowed layers attend within each window only, computed window by window: W windows padded to L rows.
WINDOW_ROWS = "window_rows"  # [W, L] int64: the (permuted) patch in each slot of each window; padding -> 0
WINDOW_MASK = "window_mask"  # [W, L] float32: 0 for a real slot, MASKED for padding (an additive key mask)
WINDOW_SLOTS = "window_slots"  # [N] int64: each patch's flat slot w * L + j, to gather the outputs back
FRAME_SEGMENTS = "frame_segments"  # [N] int64: the frame (image) of each patch; full-attention layers
IMAGE_EMBEDS = "image_embeds"
FEED_NAMES = (
    WINDOW_INDEX,
    REVERSE_INDEX,
    ROTARY_COS,
    ROTARY_SIN,
    WINDOW_ROWS,
    WINDOW_MASK,
    WINDOW_SLOTS,
    FRAME_SEGMENTS,
)
MASKED = float(np.finfo(np.float32).min)  # exp() of it after the row max is subtracted is exactly 0

MAX_ASPECT_RATIO = 200  # transformers' smart_resize refuses anything longer
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """(height, width) rounded to multiples of ``factor`` with the pixel count in [min_pixels, max_pixels],
    the aspect ratio kept as closely as possible: transformers' ``smart_resize``, step for step."""
    if height < 1 or width < 1:
        raise ImageError(f"image is {width}x{height} pixels: it has no pixels to read")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"image is {width}x{height} pixels: aspect ratio {ratio:.1f} exceeds {MAX_ASPECT_RATIO}, the most "
            "Qwen2.5-VL's image processor takes; crop or tile it first"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class VisionPreprocess:
    """The bundle's ``preprocess`` section for Qwen2.5-VL (the checkpoint's preprocessor_config.json)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: str = "bicubic"
    rescale_factor: float = 1.0 / 255.0

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merge block of patches."""
        return self.patch_size * self.merge_size

    @property
    def normalization(self) -> Normalization:
        return Normalization(self.rescale_factor, self.image_mean, self.image_std, self.resample)

    @classmethod
    def from_manifest(cls, d: Mapping[str, Any]) -> VisionPreprocess:
        """From a manifest's ``preprocess`` dict; a field it lacks takes the Qwen2.5-VL default."""
        base = cls()
        try:
            out = cls(
                patch_size=int(d.get("patch_size", base.patch_size)),
                temporal_patch_size=int(d.get("temporal_patch_size", base.temporal_patch_size)),
                merge_size=int(d.get("merge_size", base.merge_size)),
                min_pixels=int(d.get("min_pixels", base.min_pixels)),
                max_pixels=int(d.get("max_pixels", base.max_pixels)),
                image_mean=tuple(float(v) for v in d.get("image_mean", base.image_mean)),  # type: ignore[arg-type]
                image_std=tuple(float(v) for v in d.get("image_std", base.image_std)),  # type: ignore[arg-type]
                resample=str(d.get("resample", base.resample)),
                rescale_factor=float(d.get("rescale_factor", base.rescale_factor)),
            )
        except (TypeError, ValueError) as e:
            raise BundleError(f"manifest preprocess section is malformed: {e}") from None
        problems = []
        if min(out.patch_size, out.temporal_patch_size, out.merge_size) < 1:
            problems.append("patch_size, temporal_patch_size and merge_size must be positive")
        if not 0 < out.min_pixels <= out.max_pixels:
            problems.append(f"need 0 < min_pixels <= max_pixels, got {out.min_pixels} and {out.max_pixels}")
        if len(out.image_mean) != 3 or len(out.image_std) != 3 or not all(out.image_std):
            problems.append("image_mean and image_std need 3 values each, std non-zero")
        if out.resample not in RESAMPLE:
            problems.append(f"resample {out.resample!r} is not one of {sorted(RESAMPLE)}")
        if problems:
            raise BundleError(f"manifest preprocess section: {'; '.join(problems)}")
        return out

    @classmethod
    def from_preprocessor_config(cls, d: Mapping[str, Any]) -> VisionPreprocess:
        """From a checkpoint's preprocessor_config.json, read as transformers' processor reads it: ``min_pixels``
        / ``max_pixels`` override ``size`` {shortest_edge, longest_edge}; ``resample`` is a PIL filter code."""
        for step in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if d.get(step, True) is not True:
                raise BundleError(f"preprocessor_config.json sets {step} false; Qwen2.5-VL bundles take the default")
        size = d.get("size") or {}
        codes = {int(Image.NEAREST): "nearest", int(Image.BILINEAR): "bilinear", int(Image.BICUBIC): "bicubic"}
        codes[int(Image.LANCZOS)] = "lanczos"
        resample = d.get("resample", int(Image.BICUBIC))
        fields = {
            "min_pixels": d.get("min_pixels", size.get("shortest_edge")),
            "max_pixels": d.get("max_pixels", size.get("longest_edge")),
            "resample": codes.get(resample, resample) if isinstance(resample, int) else resample,
        }
        keys = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "rescale_factor")
        fields.update({k: d[k] for k in keys if k in d})
        return cls.from_manifest({k: v for k, v in fields.items() if v is not None})

    def to_manifest(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = "qwen2_vl_dynamic"
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d


def preprocess(image: Image.Image, cfg: VisionPreprocess) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """``pixel_values`` float32 [grid_h * grid_w, 3 * T * P * P], ``grid_thw`` int64 [1, 3] and the resized
    (height, width): what the model saw, so boxes in its answers map back to the original pixels."""
    img = image if image.mode == "RGB" else image.convert("RGB")
    width, height = img.size
    rh, rw = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    # Pillow returns a copy when the size already matches, as the upstream processor's resize does.
    img = img.resize((rw, rh), RESAMPLE[cfg.resample])
    pixels = np.asarray(img, dtype=np.uint8)
    lut = cfg.normalization.lut  # uint8 -> normalised float32, bit-identical to rescale then normalize
    chw = np.stack([lut[pixels[..., c], c] for c in range(3)])
    P, m, T = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = rh // P, rw // P
    # (C, gh/m, m, P, gw/m, m, P) -> (gh/m, gw/m, m, m, C, P, P): patches in merge-block order, as upstream
    patches = chw.reshape(3, gh // m, m, P, gw // m, m, P).transpose(1, 4, 2, 5, 0, 3, 6)
    # one image is a clip of T identical frames: repeat along a time axis between C and the patch pixels
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], T, P, P))
    pixel_values = np.ascontiguousarray(patches.reshape(gh * gw, 3 * T * P * P), dtype=np.float32)
    return pixel_values, np.array([[1, gh, gw]], dtype=np.int64), (rh, rw)


def _vision_int(vision: Mapping[str, Any], key: str) -> int:
    try:
        value = int(vision[key])
    except (KeyError, TypeError, ValueError):
        raise BundleError(f"manifest vision record lacks a valid {key!r}") from None
    if value < 1:
        raise BundleError(f"manifest vision record: {key} must be positive, got {value}")
    return value


def window_index(grid_thw: np.ndarray, merge: int, window_size: int, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """(window_index [N/merge^2], cu_window_seqlens): transformers' ``get_vision_window_index`` in numpy.

    Merge units are cut into square windows of ``window_size`` pixels (``window_size // merge // patch``
    units a side, ragged at the right and bottom edges) and listed window by window.
    """
    side = window_size // merge // patch
    if side < 1:
        raise BundleError(f"manifest vision record: window_size {window_size} is under one merge block")
    unit = merge * merge
    order: list[np.ndarray] = []
    cu = [0]
    offset = 0
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).tolist():
        lh, lw = h // merge, w // merge
        # Upstream pads by a whole window when the grid divides evenly; those windows are empty and dropped.
        pad_h, pad_w = side - lh % side, side - lw % side
        nh, nw = (lh + pad_h) // side, (lw + pad_w) // side
        padded = np.full((t, lh + pad_h, lw + pad_w), -1, dtype=np.int64)
        padded[:, :lh, :lw] = np.arange(t * lh * lw).reshape(t, lh, lw)
        windows = padded.reshape(t, nh, side, nw, side).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, side * side)
        seqlens = (windows >= 0).sum(-1).reshape(-1)
        flat = windows.reshape(-1)
        order.append(flat[flat >= 0] + offset)
        cu.extend((np.cumsum(seqlens) * unit + cu[-1]).tolist())
        offset += t * lh * lw
    cu_arr = np.asarray(cu, dtype=np.int64)
    cu_arr = cu_arr[np.concatenate([[True], np.diff(cu_arr) != 0])]  # torch.unique_consecutive
    return np.concatenate(order), cu_arr


def rotary_position_ids(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """[N, 2] (row, column) of each patch, in the processor's merge-block order (get_vision_position_ids)."""
    out = []
    for t, h, w in np.asarray(grid_thw, dtype=np.int64).tolist():
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
    return np.concatenate(out)


def vision_feeds(grid_thw: np.ndarray, vision: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The vision graph's inputs besides ``pixel_values``, for images of ``grid_thw`` [n, 3].

    ``vision`` is the manifest's vision record (``vision_config_record`` on the export side).
    """
    merge = _vision_int(vision, "spatial_merge_size")
    patch = _vision_int(vision, "patch_size")
    hidden, heads = _vision_int(vision, "hidden_size"), _vision_int(vision, "num_heads")
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    if (grid < 1).any() or (grid[:, 1:] % merge).any():
        raise ImageError(f"image grid {grid.tolist()} is not whole merge blocks of {merge}x{merge} patches")
    unit = merge * merge
    index, cu_windows = window_index(grid, merge, _vision_int(vision, "window_size"), patch)
    n = int(index.size) * unit

    # Rotary: one angle table per axis over head_dim/4 frequencies, [rows | cols] twice across the head.
    head_dim = hidden // heads
    spatial = head_dim // 2
    theta = np.float32(vision.get("rope_theta", 10000.0))
    inv_freq = (1.0 / theta ** (np.arange(0, spatial, 2, dtype=np.float32) / np.float32(spatial))).astype(np.float32)
    angles = rotary_position_ids(grid, merge).astype(np.float32)[..., None] * inv_freq  # [N, 2, head_dim/4]
    angles = angles.reshape(n, -1)  # [rows' freqs | cols' freqs]
    angles = np.concatenate([angles, angles], axis=-1)
    # window order, a merge unit (its merge x merge patches) at a time, as the hidden states are permuted
    angles = angles.reshape(n // unit, unit, head_dim)[index].reshape(n, head_dim)

    frames = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    return {
        WINDOW_INDEX: index.astype(np.int64),
        REVERSE_INDEX: np.argsort(index, kind="stable").astype(np.int64),
        ROTARY_COS: np.cos(angles).astype(np.float32),
        ROTARY_SIN: np.sin(angles).astype(np.float32),
        **window_slots(cu_windows),
        FRAME_SEGMENTS: np.repeat(np.arange(frames.size), frames).astype(np.int64),
    }


def image_feeds(
    image: Image.Image, cfg: VisionPreprocess, vision: Mapping[str, Any], pixel_dtype: np.dtype | type = np.float32
) -> tuple[dict[str, np.ndarray], np.ndarray, tuple[int, int]]:
    """Every input of the vision graph for one image (``pixel_values`` in the graph's dtype, float16 for an FP16
    graph), its ``grid_thw`` [1, 3] and resized (height, width); the graph returns grid_h * grid_w / merge^2
    rows of ``image_embeds``."""
    pixel_values, grid_thw, resized = preprocess(image, cfg)
    feeds = vision_feeds(grid_thw, vision)
    feeds[PIXEL_VALUES] = pixel_values.astype(pixel_dtype, copy=False)
    return feeds, grid_thw, resized


def window_slots(cu_windows: np.ndarray) -> dict[str, np.ndarray]:
    """The windows of ``cu_window_seqlens`` as a padded [W, L] table (L: the longest window), its key mask,
    and each patch's slot in it: attention then costs W x L x L per head, not N x N."""
    starts, lengths = cu_windows[:-1], np.diff(cu_windows)
    L = int(lengths.max())
    slot = np.arange(L)
    real = slot[None, :] < lengths[:, None]
    owner = np.repeat(np.arange(lengths.size), lengths)  # the window of each patch
    return {
        WINDOW_ROWS: np.where(real, starts[:, None] + slot[None, :], 0).astype(np.int64),
        WINDOW_MASK: np.where(real, np.float32(0.0), np.float32(MASKED)).astype(np.float32),
        WINDOW_SLOTS: (owner * L + np.arange(int(cu_windows[-1])) - starts[owner]).astype(np.int64),
    }
