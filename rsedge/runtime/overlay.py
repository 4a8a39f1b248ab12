"""Draw an answer onto its image: boxes for [VG], the decoded mask for [SEG] (the last image of a pair)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from rsedge.errors import OptionError
from rsedge.runtime.images import load_image, validate_image
from rsedge.runtime.outputs import draw_boxes, draw_mask, mask_for_image


def write_overlay(answer, images: Sequence[str | Path | Image.Image], path: str | Path) -> Path | None:
    """Write a PNG of the answer over its image; None when the answer has no box or mask to draw."""
    if not images:
        raise OptionError("--overlay needs an image")
    path = Path(path)
    if not path.parent.is_dir():
        raise OptionError(f"{path.parent}: no such folder for the overlay")
    pil = [validate_image(im) if isinstance(im, Image.Image) else load_image(im) for im in images]
    if answer.boxes:
        return draw_boxes(pil[0], answer.boxes, path)
    if answer.mask is not None:
        target = pil[-1]  # a change mask belongs to the second image of the pair
        return draw_mask(target, mask_for_image(answer.mask, target.width, target.height), path)
    return None
