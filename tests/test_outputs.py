"""Answer parsing: [VG] boxes on the 0-100 scale, [SEG] run-length masks, and PNG overlays."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsedge.runtime.outputs import (
    Box,
    RleMask,
    box_to_0_100,
    draw_boxes,
    draw_mask,
    format_box,
    format_rle,
    mask_for_image,
    parse_boxes,
    parse_rle_mask,
)

# ---- boxes -------------------------------------------------------------------------------------


def test_parse_single_box_scales_to_pixels() -> None:
    boxes = parse_boxes("The windmill is at [10, 20, 30, 40].", 200, 100)
    assert boxes == [Box(20.0, 20.0, 60.0, 40.0)]
    assert boxes[0].to_list() == [20.0, 20.0, 60.0, 40.0]


def test_parse_several_boxes_and_decimals() -> None:
    text = "[0, 0, 50, 50] and [50.5, 25, 100, 75]"
    assert [b.to_list() for b in parse_boxes(text, 1000, 400)] == [
        [0.0, 0.0, 500.0, 200.0],
        [505.0, 100.0, 1000.0, 300.0],
    ]


def test_parse_orders_clips_and_truncates() -> None:
    # Swapped corners are ordered, values over 100 clipped, extra numbers dropped.
    assert parse_boxes("[80, 90, 20, 10, 55, 66]", 100, 200) == [Box(20.0, 20.0, 80.0, 180.0)]
    assert parse_boxes("[90, 10, 120, 130]", 50, 50) == [Box(45.0, 5.0, 50.0, 50.0)]


def test_parse_skips_bad_groups() -> None:
    text = "[SEG] [1, 2, 3] [1.2.3, 4, 5, 6] [ , ] no box [5 10 15 20]"
    # Only the space-separated group has four valid numbers.
    assert parse_boxes(text, 100, 100) == [Box(5.0, 10.0, 15.0, 20.0)]
    assert parse_boxes("nothing here", 100, 100) == []


def test_format_box_and_round_trip() -> None:
    assert format_box([10.4, 20.5, 30, 99.6]) == "[10, 21, 30, 100]"
    assert format_box((1, 20, 9, 30)) == "[1, 20, 9, 30]"
    with pytest.raises(ValueError):
        format_box([1, 2, 3])
    box = Box(40.0, 30.0, 120.0, 90.0)
    coords = box_to_0_100(box, 400, 300)
    assert coords == [10.0, 10.0, 30.0, 30.0]
    assert parse_boxes(format_box(coords), 400, 300) == [box]


# ---- run-length masks --------------------------------------------------------------------------


def test_parse_rle_hand_case() -> None:
    rle = parse_rle_mask("others*2, water*3\nwater*5\nothers*1, bridge*4")
    assert rle is not None
    assert rle.labels == ["others", "water", "bridge"]
    np.testing.assert_array_equal(rle.grid, [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 2, 2, 2, 2]])
    assert rle.grid.dtype == np.uint8 and rle.shape == (3, 5)


def test_parse_rle_is_lenient() -> None:
    text = "\n".join(
        [
            "Here is the mask:",  # prose: no runs, ignored
            "others*4",
            "",
            "   ",
            "others*1, water*x, water*2, ???, others*1",  # malformed run dropped: width 4
            "water*2",  # short: padded with others
            "water*3, others*9",  # long: truncated
            "others*4",
        ]
    )
    rle = parse_rle_mask(text)
    assert rle is not None
    assert rle.labels == ["others", "water"]
    np.testing.assert_array_equal(
        rle.grid,
        [[0, 0, 0, 0], [0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]],
    )


def test_parse_rle_background_any_case_and_width_tie() -> None:
    rle = parse_rle_mask("Others*2, road*1\nothers*2\n")
    assert rle is not None
    assert rle.labels == ["others", "road"]
    # Widths 3 and 2 occur once each: the wider one is chosen.
    np.testing.assert_array_equal(rle.grid, [[0, 0, 1], [0, 0, 0]])


@pytest.mark.parametrize("text", ["", "\n\n", "no mask, sorry", "water*abc", "[10, 20, 30, 40]"])
def test_parse_rle_none_when_nothing_parses(text: str) -> None:
    assert parse_rle_mask(text) is None


def test_parse_rle_huge_count_is_bounded() -> None:
    rle = parse_rle_mask("others*99999999999")
    assert rle is not None and rle.grid.shape == (1, 4096)


def test_format_rle_exact_text() -> None:
    grid = np.array([[0, 0, 1], [2, 2, 2]], dtype=np.uint8)
    assert format_rle(grid, ["others", "water", "bridge"]) == "others*2, water*1\nbridge*3"
    with pytest.raises(ValueError):
        format_rle(np.array([[0, 3]]), ["others", "water"])


def test_rle_round_trips() -> None:
    rng = np.random.default_rng(0)
    labels = ["others", "water", "building"]
    grid = rng.integers(0, 3, size=(16, 16)).astype(np.uint8)
    grid[0, :3] = [0, 1, 2]  # first appearance order = label order, as the parser numbers them
    text = format_rle(grid, labels)
    rle = parse_rle_mask(text)
    assert rle is not None
    assert rle.labels == labels
    np.testing.assert_array_equal(rle.grid, grid)
    assert format_rle(rle.grid, rle.labels) == text


def test_mask_for_image_nearest_and_labels() -> None:
    rle = RleMask(labels=["others", "water", "road"], grid=np.array([[0, 1], [2, 0]], dtype=np.uint8))
    every = mask_for_image(rle, 4, 2)  # width 4, height 2
    assert every.shape == (2, 4) and every.dtype == bool
    np.testing.assert_array_equal(every, [[False, False, True, True], [True, True, False, False]])
    water = mask_for_image(rle, 4, 4, label="water")
    np.testing.assert_array_equal(water[:2, 2:], True)
    assert water.sum() == 4
    assert mask_for_image(rle, 4, 4, label="ROAD").sum() == 4  # case-insensitive fallback
    assert not mask_for_image(rle, 4, 4, label="forest").any()


# ---- overlays ------------------------------------------------------------------------------------


def test_draw_boxes_writes_png(tmp_path: Path) -> None:
    img = Image.new("RGB", (100, 80), (255, 255, 255))
    path = draw_boxes(img, [Box(20, 30, 70, 60), Box(5, 5, 15, 15)], tmp_path / "boxes.png", labels=["mill"])
    out = Image.open(path)
    assert out.format == "PNG" and out.size == (100, 80)
    assert out.getpixel((45, 60)) == (0, 0, 255)  # bottom edge of box 1, first colour
    assert out.getpixel((45, 45)) == (255, 255, 255)  # inside stays clear
    assert out.getpixel((10, 15)) == (255, 0, 0)  # second box, second colour
    assert img.getpixel((45, 60)) == (255, 255, 255)  # caller's image untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boxes.png"]  # no temp file left


def test_draw_mask_blends(tmp_path: Path) -> None:
    img = Image.new("RGB", (6, 4), (0, 0, 0))
    mask = np.zeros((4, 6), dtype=bool)
    mask[1:3, 2:4] = True
    path = draw_mask(img, mask, tmp_path / "mask.png", colour=(255, 0, 0))
    out = np.asarray(Image.open(path))
    assert tuple(out[1, 2]) == (round(255 * 0.45), 0, 0)
    assert tuple(out[0, 0]) == (0, 0, 0)
    with pytest.raises(ValueError):
        draw_mask(img, np.zeros((6, 4), dtype=bool), tmp_path / "bad.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.png"]


def test_overwrite_is_atomic_replace(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    target.write_bytes(b"old")
    draw_mask(Image.new("RGB", (3, 3)), np.ones((3, 3), bool), target)
    assert Image.open(target).size == (3, 3)


def test_runtime_modules_import_without_torch() -> None:
    # The runtime runs on a Jetson without torch/transformers/onnx; a stray import would break it there.
    code = (
        "import sys\n"
        "import rsedge.runtime.features, rsedge.runtime.images\n"
        "import rsedge.runtime.outputs, rsedge.runtime.preprocess\n"
        "print(sorted(m for m in ('torch', 'transformers', 'onnx') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
