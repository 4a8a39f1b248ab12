"""PyTorch twin of ``rsedge.runtime.features``: visual-token merging with torch ops, as llava_arch does.

The reference model uses this so its token layout follows upstream's op sequence (view, permute,
unpad, ``nn.functional.interpolate``, cat with ``image_newline``); the numpy runtime is tested
against it. Grid and unpad arithmetic come from the shared runtime helpers so both agree on shapes.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional

from rsedge.runtime.features import DOWNSAMPLE_THRESHOLD, tokens_per_side
from rsedge.runtime.preprocess import Pinpoints, anyres_grid_shape


def merge_square_torch(features: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
    """[1, T, H] -> [T + 1, H]: the single-image branch, one image_newline at the end."""
    if features.dim() != 3 or features.shape[0] != 1:
        raise ValueError(f"expected features of shape [1, T, H], got {list(features.shape)}")
    return torch.cat((features[0], newline[None].to(features.dtype)), dim=0)


def unpad_image_torch(tensor: torch.Tensor, image_size_wh: tuple[int, int]) -> torch.Tensor:
    """Crop the padding off a [C, H, W] map, with LLaVA's int() truncation."""
    orig_w, orig_h = image_size_wh
    cur_h, cur_w = tensor.shape[1:]
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(orig_h * (cur_w / orig_w))
        pad = (cur_h - new_h) // 2
        return tensor[:, pad : cur_h - pad, :]
    new_w = int(orig_w * (cur_h / orig_h))
    pad = (cur_w - new_w) // 2
    return tensor[:, :, pad : cur_w - pad]


def merge_anyres_torch(
    features: torch.Tensor,
    newline: torch.Tensor,
    image_size_wh: tuple[int, int],
    pinpoints: Pinpoints,
    tile_size: int,
    max_patches: int | None,
) -> torch.Tensor:
    """[1 + n, T, H] (base view, then tiles row-major) -> [N, H]; max_patches None = plain anyres."""
    base, tiles = features[0], features[1:]
    unit = tokens_per_side(base.shape[0])
    num_w, num_h = anyres_grid_shape(image_size_wh, pinpoints, tile_size)
    fmap = tiles.view(num_h, num_w, unit, unit, -1)
    # (nh, nw, h, w, C) -> (C, nh, h, nw, w) -> (C, nh*h, nw*w)
    fmap = fmap.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
    fmap = unpad_image_torch(fmap, image_size_wh)
    _, height, width = fmap.shape
    if max_patches is not None:
        times = math.sqrt(height * width / (max_patches * unit**2))
        if times > DOWNSAMPLE_THRESHOLD:
            size = [int(height // times), int(width // times)]
            fmap = functional.interpolate(fmap[None], size, mode="bilinear", align_corners=False)[0]
    column = newline[:, None, None].to(fmap.dtype).expand(*fmap.shape[:-1], 1)
    fmap = torch.cat((fmap, column), dim=-1)
    return torch.cat((base, fmap.flatten(1, 2).transpose(0, 1)), dim=0)
