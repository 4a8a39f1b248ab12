"""Parse RSUniVLM answers into boxes and masks, and draw them over the input image.

- ``[VG]`` answers hold boxes ``[x1, y1, x2, y2]`` on a 0-100 scale of the image's width/height.
- ``[SEG]`` answers are row-wise run-length text: rows separated by newlines, each row a list of
  ``label*count`` runs joined by ", ", with ``others`` as background.

Model output is not always well formed, so parsing is lenient (malformed pieces are skipped, never
guessed at) and returns nothing rather than raising when nothing usable is found.

Runtime module: numpy, Pillow and the stdlib only.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rsedge.fsutil import write_file_atomic

# The demo's own pattern: a bracket holding only digits, dots, commas and spaces.
BOX_PATTERN = re.compile(r"\[([0-9., ]+)\]")
BACKGROUND = "others"
_COUNT = re.compile(r"[0-9]+")
# Guard against runaway output such as "others*99999999": no real mask grid is anywhere near this.
MAX_GRID_SIDE = 4096
# Label indices are stored as uint8.
MAX_LABELS = 256

BOX_COLOURS = ((0, 0, 255), (255, 0, 0), (0, 255, 0), (255, 255, 0), (0, 255, 255), (255, 0, 255))


@dataclass
class Box:
    """An axis-aligned box in image pixels, x1 <= x2 and y1 <= y2."""

    x1: float
    y1: float
    x2: float
    y2: float

    def to_list(self) -> list[float]:
        return [self.x1, self.y1, self.x2, self.y2]


def _numbers(group: str) -> list[float] | None:
    """Numbers of one bracket group, or None when any piece is not a number (e.g. "1.2.3")."""
    values = []
    for token in re.split(r"[,\s]+", group.strip()):
        if not token:
            continue
        try:
            values.append(float(token))
        except ValueError:
            return None
    return values


def parse_boxes(text: str, width: int, height: int) -> list[Box]:
    """Every ``[x1, y1, x2, y2]`` (0-100 scale) in ``text`` as pixel boxes clipped to the image.

    Groups with more than 4 numbers keep the first 4 (as the demo does); groups with fewer, or with
    a piece that is not a number, are skipped.
    """
    boxes = []
    for group in BOX_PATTERN.findall(text):
        values = _numbers(group)
        if values is None or len(values) < 4:
            continue
        x1, y1, x2, y2 = values[:4]
        xs = sorted((min(max(x1 / 100 * width, 0.0), width), min(max(x2 / 100 * width, 0.0), width)))
        ys = sorted((min(max(y1 / 100 * height, 0.0), height), min(max(y2 / 100 * height, 0.0), height)))
        boxes.append(Box(xs[0], ys[0], xs[1], ys[1]))
    return boxes


def format_box(box_0_100: Sequence[float]) -> str:
    """``[x1, y1, x2, y2]`` with integers (half rounds up), the text form the model is trained on."""
    if len(box_0_100) != 4:
        raise ValueError(f"a box has 4 values, got {len(box_0_100)}")
    return "[" + ", ".join(str(math.floor(float(v) + 0.5)) for v in box_0_100) + "]"


def box_to_0_100(box: Box, width: int, height: int) -> list[float]:
    """Pixel box -> the model's 0-100 scale (the inverse of parse_boxes' scaling)."""
    return [box.x1 / width * 100, box.y1 / height * 100, box.x2 / width * 100, box.y2 / height * 100]


@dataclass
class RleMask:
    """A decoded [SEG] answer: ``grid`` holds indices into ``labels``; ``labels[0]`` is "others"."""

    labels: list[str]
    grid: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.grid.shape[0]), int(self.grid.shape[1])


def _parse_row(line: str, labels: list[str], index: dict[str, int]) -> list[tuple[int, int]]:
    """Runs (label index, count) of one row; malformed runs are dropped, new labels registered."""
    runs = []
    for piece in line.split(","):
        label, star, count_text = piece.strip().rpartition("*")
        label = label.strip()
        count_text = count_text.strip()
        if not star or not label or not _COUNT.fullmatch(count_text):
            continue
        count = int(count_text)
        if count == 0:
            continue
        key = BACKGROUND if label.lower() == BACKGROUND else label
        if key not in index:
            if len(labels) >= MAX_LABELS:
                continue
            index[key] = len(labels)
            labels.append(key)
        runs.append((index[key], count))
    return runs


def parse_rle_mask(text: str) -> RleMask | None:
    """Decode run-length mask text; None when no row parses.

    Blank lines and malformed runs are ignored. The grid width is the most common row width (ties go
    to the wider); short rows are padded with "others", long rows truncated. Labels keep their
    spelling; "others" is recognised in any case.
    """
    labels = [BACKGROUND]
    index = {BACKGROUND: 0}
    rows = []
    for line in text.splitlines():
        runs = _parse_row(line, labels, index)
        if runs:
            rows.append(runs)
    if not rows:
        return None
    widths = Counter(sum(count for _, count in runs) for runs in rows)
    cols = min(max(widths, key=lambda w: (widths[w], w)), MAX_GRID_SIDE)
    rows = rows[:MAX_GRID_SIDE]
    grid = np.zeros((len(rows), cols), dtype=np.uint8)
    for r, runs in enumerate(rows):
        col = 0
        for label_index, count in runs:
            if col >= cols:
                break
            grid[r, col : col + count] = label_index
            col += count
    return RleMask(labels=labels, grid=grid)


def format_rle(grid: np.ndarray, labels: Sequence[str]) -> str:
    """Run-length text of a label-index grid; parse_rle_mask inverts it for well-formed input."""
    grid = np.asarray(grid)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"expected a non-empty 2-D grid, got shape {list(grid.shape)}")
    if int(grid.max()) >= len(labels) or int(grid.min()) < 0:
        raise ValueError(f"grid holds label indices outside 0..{len(labels) - 1}")
    lines = []
    for row in grid:
        # Start of each run: column 0 and wherever the value changes.
        starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
        ends = np.r_[starts[1:], row.size]
        lines.append(", ".join(f"{labels[row[s]]}*{e - s}" for s, e in zip(starts, ends, strict=True)))
    return "\n".join(lines)


def mask_for_image(rle: RleMask, width: int, height: int, label: str | None = None) -> np.ndarray:
    """Boolean [height, width] mask of ``label`` (all non-"others" labels when None).

    The grid is scaled with PIL nearest-neighbour. An unknown label gives an empty mask: the model is
    free to answer without it.
    """
    if label is None:
        selected = rle.grid != 0
    else:
        wanted = [i for i, name in enumerate(rle.labels) if name == label]
        if not wanted:
            wanted = [i for i, name in enumerate(rle.labels) if name.lower() == label.lower()]
        selected = np.isin(rle.grid, wanted)
    small = Image.fromarray(selected.astype(np.uint8) * 255)
    return np.asarray(small.resize((width, height), Image.NEAREST)) > 0


def _save_atomic(img: Image.Image, path: str | Path, overwrite: bool = True) -> Path:
    """Write a PNG via a temp file in the same folder, so readers never see a half-written file.

    The file gets the usual permissions (0666 less the umask); ``overwrite=False`` refuses an existing path.
    """
    return write_file_atomic(Path(path), lambda handle: img.save(handle, format="PNG"), overwrite=overwrite)


def draw_boxes(
    img: Image.Image,
    boxes: Sequence[Box],
    path: str | Path,
    labels: Sequence[str] | None = None,
    overwrite: bool = True,
) -> Path:
    """Draw box outlines (3 px) with a label each (default "1", "2", ...) and write a PNG."""
    canvas = img.convert("RGB")  # convert() copies, so the caller's image is untouched
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, box in enumerate(boxes):
        colour = BOX_COLOURS[i % len(BOX_COLOURS)]
        draw.rectangle([box.x1, box.y1, box.x2, box.y2], outline=colour, width=3)
        text = labels[i] if labels is not None and i < len(labels) else str(i + 1)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        # Tag above the box when there is room, else just inside its top edge.
        tag_y = box.y1 - (bottom - top) - 4 if box.y1 >= (bottom - top) + 4 else box.y1
        draw.rectangle([box.x1, tag_y, box.x1 + (right - left) + 4, tag_y + (bottom - top) + 4], fill=colour)
        draw.text((box.x1 + 2 - left, tag_y + 2 - top), text, fill=(255, 255, 255), font=font)
    return _save_atomic(canvas, path, overwrite)


def draw_mask(
    img: Image.Image,
    mask_bool: np.ndarray,
    path: str | Path,
    colour: tuple[int, int, int] = (255, 0, 0),
    opacity: float = 0.45,
    overwrite: bool = True,
) -> Path:
    """Blend ``colour`` over the masked pixels at ``opacity`` and write a PNG."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be within 0..1, got {opacity}")
    mask_bool = np.asarray(mask_bool, dtype=bool)
    if mask_bool.shape != (img.height, img.width):
        raise ValueError(f"mask shape {list(mask_bool.shape)} does not match image {img.height}x{img.width}")
    base = img.convert("RGB")
    fill = Image.new("RGB", base.size, tuple(colour))
    alpha = Image.fromarray(mask_bool.astype(np.uint8) * np.uint8(round(255 * opacity)))
    return _save_atomic(Image.composite(fill, base, alpha), path, overwrite)
