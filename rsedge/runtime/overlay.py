"""Draw an answer onto its image: boxes for [VG], the decoded mask for [SEG] (the last image of a pair)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from rsedge.errors import OptionError
from rsedge.runtime.images import load_image, validate_image
from rsedge.runtime.outputs import draw_boxes, draw_mask, mask_for_image


def _same_file(a: Path, b: Path) -> bool:
    """Same file by resolved path (symlinks) or by inode (hard links)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def check_overlay_target(path: str | Path, images: Sequence[str | Path | Image.Image], overwrite: bool) -> Path:
    """Refuse, before any work, an overlay path that is a folder, an input image (always), or exists (unless
    ``overwrite``)."""
    path = Path(path)
    if path.is_dir():
        raise OptionError(f"--overlay {path} is a folder; give the path of a PNG file to write")
    if not path.parent.is_dir():
        raise OptionError(f"{path.parent}: no such folder for the overlay")
    for im in images:
        if isinstance(im, (str, Path)) and _same_file(path, Path(im)):
            raise OptionError(f"--overlay {path} is the input image {im}; choose another file")
    if not overwrite and os.path.lexists(path):
        raise OptionError(f"--overlay {path} already exists; pass --force to replace it")
    return path


def write_overlay(
    answer, images: Sequence[str | Path | Image.Image], path: str | Path, overwrite: bool = False
) -> Path | None:
    """Write a PNG of the answer over its image; None when the answer has no box or mask to draw.

    An existing file is replaced only with ``overwrite``, and an input image never.
    """
    if not images:
        raise OptionError("--overlay needs an image")
    path = check_overlay_target(path, images, overwrite)
    pil = [validate_image(im) if isinstance(im, Image.Image) else load_image(im) for im in images]
    if answer.boxes:
        return draw_boxes(pil[0], answer.boxes, path, overwrite=overwrite)
    if answer.mask is not None:
        target = pil[-1]  # a change mask belongs to the second image of the pair
        return draw_mask(target, mask_for_image(answer.mask, target.width, target.height), path, overwrite=overwrite)
    return None
