"""Image preprocessing for the SigLIP tower of RSUniVLM / LLaVA-OneVision, without torch.

Two paths, as in LLaVA-NeXT's ``process_images``:

- ``square`` (the released RSUniVLM config): bicubic resize straight to SxS, no padding.
- ``anyres`` / ``anyres_max_N``: pick a grid pinpoint, resize keeping the aspect ratio, pad with
  black, cut SxS tiles, and put the whole image resized to SxS in front.

Every tile is normalised like SigLIP's processor: x/255, then (x - 0.5) / 0.5. The integer arithmetic
and PIL filters reproduce upstream exactly, so pixel values match bit for bit.

Runtime module: numpy, Pillow and the stdlib only.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image

Pinpoints = Sequence[Sequence[int]] | str
Size = tuple[int, int]  # (width, height)

RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}


@dataclass(frozen=True)
class Normalization:
    """How pixels become the vision graph's input: the bundle's ``preprocess`` fields (rescale, mean, std,
    resample), per channel. The default is SigLIP's: x / 255, then (x - 0.5) / 0.5, bicubic."""

    rescale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    resample: str = "bicubic"

    @cached_property
    def lut(self) -> np.ndarray:
        """[256, 3] uint8 -> normalised float32, built with the same operation order as transformers' rescale
        (float64 multiply, cast to float32) and normalize (float32 (x - mean) / std): bit-identical values, much
        faster than the arithmetic per pixel."""
        scaled = (np.arange(256, dtype=np.float64) * self.rescale).astype(np.float32)[:, None]
        return (scaled - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)

    @classmethod
    def from_manifest(cls, pre: dict) -> Normalization:
        """From a bundle's ``preprocess`` section; bundles before these fields were SigLIP's."""
        d = cls()
        out = cls(
            float(pre.get("rescale", d.rescale)),
            tuple(float(v) for v in pre.get("mean", d.mean)),  # type: ignore[arg-type]
            tuple(float(v) for v in pre.get("std", d.std)),  # type: ignore[arg-type]
            str(pre.get("resample", d.resample)),
        )
        if len(out.mean) != 3 or len(out.std) != 3 or not all(out.std) or out.resample not in RESAMPLE:
            raise ValueError(f"preprocess mean/std need 3 values, std non-zero, resample one of {sorted(RESAMPLE)}")
        return out


SIGLIP = Normalization()


def normalize(img: Image.Image, image_size: int, norm: Normalization = SIGLIP) -> np.ndarray:
    """Resize to (S, S) and normalise; returns float32 [3, S, S]."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (image_size, image_size):
        # Pillow returns a plain copy when the size already matches, so tiles pass through untouched,
        # exactly as they do in the upstream processor.
        img = img.resize((image_size, image_size), RESAMPLE[norm.resample])
    pixels = np.asarray(img, dtype=np.uint8)
    lut = norm.lut
    return np.ascontiguousarray(np.stack([lut[pixels[..., c], c] for c in range(3)]))


def preprocess_square(img: Image.Image, image_size: int, norm: Normalization = SIGLIP) -> np.ndarray:
    """The ``square`` path: one image, float32 [1, 3, S, S]."""
    return normalize(img, image_size, norm)[None]


def possible_resolutions(
    pinpoints: Pinpoints,
    patch_size: int,
    image_size: int | None = None,
) -> list[tuple[int, int]]:
    """Grid pinpoints as a list of (width, height) pixel resolutions.

    Accepts a list of [w, h] pairs, a string literal of such a list, or LLaVA-NeXT's range string
    "(1x1),...,(6x6)": the first and last "(AxB)" give an inclusive range of tile counts (width
    outer, height inner) multiplied by the tile edge. Upstream calls that edge ``patch_size``; pass
    ``image_size`` (the vision tower's input size) to name it explicitly, in which case
    ``patch_size`` (the ViT patch) is not used.
    """
    tile = image_size if image_size is not None else patch_size
    if isinstance(pinpoints, str):
        if "x" in pinpoints:
            # As upstream: only the first and last pair matter, the middle is implied by the range.
            matches = re.findall(r"\((\d+)x(\d+)\)", pinpoints)
            if not matches:
                raise ValueError(f"cannot parse grid pinpoints {pinpoints!r}")
            (w0, h0), (w1, h1) = (tuple(map(int, m)) for m in (matches[0], matches[-1]))
            return [(i * tile, j * tile) for i in range(w0, w1 + 1) for j in range(h0, h1 + 1)]
        pinpoints = ast.literal_eval(pinpoints)
    resolutions = [(int(p[0]), int(p[1])) for p in pinpoints]
    if not resolutions:
        raise ValueError("grid pinpoints are empty")
    return resolutions


def select_best_resolution(original_size: tuple[int, int], resolutions: Sequence[Size]) -> Size:
    """LLaVA-NeXT's choice: most effective pixels after downscaling, then least waste; first wins ties."""
    orig_w, orig_h = original_size
    best: tuple[int, int] | None = None
    best_effective = 0
    best_wasted = float("inf")
    for width, height in resolutions:
        scale = min(width / orig_w, height / orig_h)
        down_w, down_h = int(orig_w * scale), int(orig_h * scale)
        effective = min(down_w * down_h, orig_w * orig_h)
        wasted = width * height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best_effective, best_wasted, best = effective, wasted, (width, height)
    if best is None:
        raise ValueError(f"no usable grid pinpoint for an image of {orig_w}x{orig_h}")
    return best


def resize_and_pad(img: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Resize keeping the aspect ratio (bicubic, ceil on the short side) and centre on black."""
    orig_w, orig_h = img.size
    target_w, target_h = target
    scale_w = target_w / orig_w
    scale_h = target_h / orig_h
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(orig_h * scale_w), target_h)
    else:
        new_w, new_h = min(math.ceil(orig_w * scale_h), target_w), target_h
    # Upstream calls resize() with no filter, which is BICUBIC for RGB in Pillow >= 7.
    resized = img.convert("RGB").resize((new_w, new_h), Image.BICUBIC)
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(resized, ((target_w - new_w) // 2, (target_h - new_h) // 2))
    return canvas


def divide_to_tiles(img: Image.Image, tile_size: int) -> list[Image.Image]:
    """Cut into tile_size squares, row-major; a ragged edge is padded with black by crop()."""
    width, height = img.size
    return [
        img.crop((left, top, left + tile_size, top + tile_size))
        for top in range(0, height, tile_size)
        for left in range(0, width, tile_size)
    ]


def anyres_grid_shape(image_size_wh: Size, pinpoints: Pinpoints, tile_size: int) -> tuple[int, int]:
    """Tiles across and down (num_w, num_h) for an image of (width, height)."""
    width, height = select_best_resolution(image_size_wh, possible_resolutions(pinpoints, tile_size))
    return width // tile_size, height // tile_size


def preprocess_anyres(
    img: Image.Image, image_size: int, pinpoints: Pinpoints, norm: Normalization = SIGLIP
) -> np.ndarray:
    """The ``anyres`` path: float32 [1 + n, 3, S, S], base image first, then tiles row-major."""
    img = img.convert("RGB") if img.mode != "RGB" else img
    best = select_best_resolution(img.size, possible_resolutions(pinpoints, image_size))
    tiles = divide_to_tiles(resize_and_pad(img, best), image_size)
    # The base view is a plain squash to SxS (upstream keeps this resize rather than padding).
    base = img.resize((image_size, image_size), RESAMPLE[norm.resample])
    return np.stack([normalize(view, image_size, norm) for view in [base, *tiles]])
