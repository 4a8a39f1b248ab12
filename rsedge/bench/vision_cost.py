"""What one image costs the vision graph of a bundle, for ``rsedge estimate``: its FLOPs, its peak activations and the
visual tokens it adds to the prompt, each with the formula that gave it.

Two kinds of tower, told apart by the manifest's ``preprocess.kind`` (how the bundle reads an image):

- a fixed square input (SigLIP in RSUniVLM, UniRS, VILA-1.5; ``model.vision``): every image is the same work;
- dynamic resolution (Qwen2.5-VL, ``qwen2_vl_dynamic``; the manifest's ``vision`` record): an image's patch count
  follows its size (smart_resize within the bundle's min/max pixels), so the estimate assumes an image size
  (:data:`DEFAULT_IMAGE`, or ``--image-size``) and says which. Its graph (rsedge.models.qwen2_5_vl.vision) runs
  windowed blocks over a padded window table (W x L x L scores per head) and full-attention blocks over all N patches,
  :data:`FULL_ATTENTION_HEADS_PER_PASS` heads at a time, against an N x N float32 frame mask.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from rsedge.errors import BundleError, OptionError

DEFAULT_IMAGE = (1024, 1024)  # (width, height): a typical remote-sensing tile
# rsedge.models.qwen2_5_vl.vision.HEADS_PER_PASS (kept apart: this module must not import the exporter; a test holds
# the two equal)
FULL_ATTENTION_HEADS_PER_PASS = 2
SCORES_BYTES = 4  # the vision graphs cast attention scores to float32 before the mask and softmax


class VisionCost(Protocol):
    label: str  # the memory term's name
    tokens: int  # visual tokens one image adds to the prompt
    image: dict[str, Any]  # the image assumed, for the report

    def flops(self, text_hidden: int) -> tuple[int, str]: ...

    def activation_bytes(self, text_hidden: int, itemsize: int) -> tuple[int, str]: ...


# -- a fixed square input ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SquareTower:
    """A ViT on one fixed square input (the estimate's :class:`VisionDims` arithmetic)."""

    dims: Any  # rsedge.bench.estimate.VisionDims
    label: str = "activations: vision, one image"

    @property
    def tokens(self) -> int:
        return self.dims.tokens

    @property
    def image(self) -> dict[str, Any]:
        side = self.dims.image_size
        return {"kind": "fixed", "input": [side, side], "tokens": self.tokens}

    def flops(self, text_hidden: int) -> tuple[int, str]:
        from rsedge.bench.estimate import vision_flops

        return vision_flops(self.dims, text_hidden), "patch embedding + layers x (linears + 4 T^2 D) + connector"

    def activation_bytes(self, text_hidden: int, itemsize: int) -> tuple[int, str]:
        from rsedge.bench.estimate import vision_activation_bytes

        v = self.dims
        how = (
            f"max(attention {v.tokens} x 5 x {v.hidden} + 2 x {v.heads} x {v.tokens}^2, MLP {v.tokens} x "
            f"(2 x {v.hidden} + 3 x {v.intermediate})) + pixels + features, x {itemsize} bytes"
        )
        return vision_activation_bytes(v, text_hidden, itemsize), how


def square_tower(manifest: Mapping[str, Any], image_size: tuple[int, int] | None) -> SquareTower:
    from rsedge.bench.estimate import VisionDims

    dims = VisionDims.from_config((manifest.get("model") or {}).get("vision", {}), "model.vision")
    if image_size is not None:
        raise OptionError(
            f"--image-size: this bundle's vision graph takes every image at {dims.image_size} px; the option is for "
            "dynamic-resolution bundles (Qwen2.5-VL)"
        )
    return SquareTower(dims)


# -- dynamic resolution (Qwen2.5-VL) --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DynamicTower:
    """Qwen2.5-VL's window-attention tower + 2x2 PatchMerger on one image of an assumed size."""

    size: tuple[int, int]  # (width, height) of the image as given
    resized: tuple[int, int]  # (height, width) after smart_resize
    patches: int  # N
    windows: int  # W, the padded window table's rows
    window_len: int  # L, its columns (the longest window)
    depth: int
    full_blocks: int
    hidden: int
    intermediate: int
    heads: int
    patch_dim: int  # in_channels x temporal_patch_size x patch^2
    unit: int  # patches per visual token (spatial_merge_size^2)
    out_hidden: int

    @property
    def tokens(self) -> int:
        return self.patches // self.unit

    @property
    def label(self) -> str:
        w, h = self.size
        return f"activations: vision, one {w}x{h} image ({self.tokens} visual tokens)"

    @property
    def image(self) -> dict[str, Any]:
        return {
            "kind": "dynamic",
            "size": list(self.size),
            "resized_hw": list(self.resized),
            "patches": self.patches,
            "tokens": self.tokens,
            "how": f"smart_resize of {self.size[0]}x{self.size[1]} to multiples of the merge block within the "
            f"bundle's min/max pixels -> {self.resized[1]}x{self.resized[0]}, {self.patches} patches / {self.unit}",
        }

    def flops(self, text_hidden: int) -> tuple[int, str]:
        N, D, F, W, L = self.patches, self.hidden, self.intermediate, self.windows, self.window_len
        windowed = self.depth - self.full_blocks
        patch = 2 * N * self.patch_dim * D
        linears = self.depth * 2 * N * (4 * D * D + 3 * D * F)
        attention = windowed * 4 * W * L * L * D + self.full_blocks * 4 * N * N * D
        merger = 2 * self.tokens * (self.unit * D * self.unit * D + self.unit * D * self.out_hidden)
        how = (
            f"patch embedding 2 x {N} x {self.patch_dim} x {D} + {self.depth} blocks x 2 x {N} x (4 x {D}^2 + 3 x {D} "
            f"x {F}) + {windowed} windowed blocks x 4 x {W} windows x {L}^2 x {D} + {self.full_blocks} full blocks x "
            f"4 x {N}^2 x {D} + merger 2 x {self.tokens} x ({self.unit * D}^2 + {self.unit * D} x {self.out_hidden})"
        )
        return patch + linears + attention + merger, how

    def activation_bytes(self, text_hidden: int, itemsize: int) -> tuple[int, str]:
        N, D, F, W, L = self.patches, self.hidden, self.intermediate, self.windows, self.window_len
        rows = N * 5 * D * itemsize  # q, k, v, residual, output
        windowed = rows + 2 * self.heads * W * L * L * SCORES_BYTES
        passes = min(FULL_ATTENTION_HEADS_PER_PASS, self.heads)
        full = rows + 2 * passes * N * N * SCORES_BYTES if self.full_blocks else 0
        mlp = N * (2 * D + 3 * F) * itemsize
        mask = N * N * SCORES_BYTES if self.full_blocks else 0  # the frame mask, live across the full blocks
        io = N * self.patch_dim * itemsize + self.tokens * self.out_hidden * itemsize
        how = (
            f"max(windowed attention {N} x 5 x {D} x {itemsize} + 2 x {self.heads} x {W} x {L}^2 x {SCORES_BYTES}, "
            f"full attention {N} x 5 x {D} x {itemsize} + 2 x {passes} heads x {N}^2 x {SCORES_BYTES}, MLP {N} x (2 x "
            f"{D} + 3 x {F}) x {itemsize}) + frame mask {N}^2 x {SCORES_BYTES} + pixels {N} x {self.patch_dim} + "
            f"features {self.tokens} x {self.out_hidden}, x {itemsize}"
        )
        return max(windowed, full, mlp) + mask + io, how


def dynamic_tower(manifest: Mapping[str, Any], image_size: tuple[int, int] | None) -> DynamicTower:
    from rsedge.runtime.families.qwen2_5_vl_image import (
        WINDOW_ROWS,
        VisionPreprocess,
        smart_resize,
        window_index,
        window_slots,
    )

    record = manifest.get("vision")
    if not isinstance(record, Mapping):
        raise BundleError("manifest has no vision record (a dynamic-resolution bundle keeps its tower's dimensions)")
    pre = VisionPreprocess.from_manifest(manifest.get("preprocess") or {})

    def pos(key: str) -> int:
        v = record.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise BundleError(f"manifest field vision.{key} must be a positive integer")
        return v

    full = record.get("fullatt_block_indexes", [])
    if not isinstance(full, list) or not all(isinstance(i, int) for i in full):
        raise BundleError("manifest field vision.fullatt_block_indexes must be a list of block indexes")
    width, height = image_size or DEFAULT_IMAGE
    rh, rw = smart_resize(height, width, pre.factor, pre.min_pixels, pre.max_pixels)
    patch, merge = pos("patch_size"), pos("spatial_merge_size")
    grid = np.array([[1, rh // patch, rw // patch]], dtype=np.int64)
    _, cu_windows = window_index(grid, merge, pos("window_size"), patch)
    W, L = window_slots(cu_windows)[WINDOW_ROWS].shape
    return DynamicTower(
        size=(width, height),
        resized=(rh, rw),
        patches=int(grid[0, 1] * grid[0, 2]),
        windows=int(W),
        window_len=int(L),
        depth=pos("depth"),
        full_blocks=len({i for i in full if 0 <= i < pos("depth")}),
        hidden=pos("hidden_size"),
        intermediate=pos("intermediate_size"),
        heads=pos("num_heads"),
        patch_dim=pos("in_channels") * pos("temporal_patch_size") * patch * patch,
        unit=merge * merge,
        out_hidden=pos("out_hidden_size"),
    )


# preprocess.kind -> the tower that reads images that way; any other kind: a fixed square input
TOWERS: dict[str, Callable[[Mapping[str, Any], tuple[int, int] | None], VisionCost]] = {
    "qwen2_vl_dynamic": dynamic_tower,
}


def vision_cost(manifest: Mapping[str, Any], image_size: tuple[int, int] | None = None) -> VisionCost:
    """The cost model of ``manifest``'s vision graph on one image (``image_size`` (width, height): dynamic resolution
    only; None: :data:`DEFAULT_IMAGE`)."""
    kind = (manifest.get("preprocess") or {}).get("kind")
    return TOWERS.get(kind, square_tower)(manifest, image_size)


def parse_image_size(text: str) -> tuple[int, int]:
    """``WIDTHxHEIGHT`` -> (width, height)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise OptionError(f"--image-size must be WIDTHxHEIGHT in pixels (e.g. 1024x1024), got {text!r}")
    return int(parts[0]), int(parts[1])
