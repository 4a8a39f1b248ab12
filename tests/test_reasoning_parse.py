"""parse_reasoning on the answer shapes reasoning grounders really write, and their boxes mapped back to the image."""

from __future__ import annotations

import random

import pytest

from rsedge.errors import ImageError
from rsedge.runtime.reasoning import (
    NORM_1000,
    PIXELS,
    Reasoning,
    map_box,
    map_boxes,
    parse_reasoning,
    smart_resize,
)

R1 = (
    "<think>The storage tank on the left is the larger of the two round shapes near the road.</think>\n"
    '<answer>[{"bbox_2d": [112, 340, 268, 497], "label": "storage tank"}]</answer>'
)


def test_the_r1_shape():
    r = parse_reasoning(R1)
    assert r.well_formed and r.box_scale == PIXELS
    assert r.reasoning.startswith("The storage tank on the left") and r.reasoning.endswith("road.")
    assert r.answer == '[{"bbox_2d": [112, 340, 268, 497], "label": "storage tank"}]'
    assert r.boxes == [(112.0, 340.0, 268.0, 497.0)] and r.labels == ["storage tank"]
    assert r.raw == R1 and r.tagged


@pytest.mark.parametrize(
    "text, boxes, labels",
    [
        # a fenced JSON list of several objects, VLM-R1 style
        (
            '<think>two bridges</think><answer>```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "bridge"}, '
            '{"bbox_2d": [50.5, 60, 70, 80.25], "label": "bridge"}]\n```</answer>',
            [(10, 20, 30, 40), (50.5, 60, 70, 80.25)],
            ["bridge", "bridge"],
        ),
        # a single object, no list
        ('<answer>{"bbox_2d": [1, 2, 3, 4], "label": "ship"}</answer>', [(1, 2, 3, 4)], ["ship"]),
        # bare 4-number lists, several, in prose
        (
            "<answer>The tanks are at [1, 2, 3, 4] and [5.5, 6, 7, 8.5].</answer>",
            [(1, 2, 3, 4), (5.5, 6, 7, 8.5)],
            [None, None],
        ),
        # a JSON list of lists
        ("<answer>[[1, 2, 3, 4], [10, 20, 30, 40]]</answer>", [(1, 2, 3, 4), (10, 20, 30, 40)], [None, None]),
        # corners swapped: normalised
        ('<answer>[{"bbox_2d": [300, 400, 100, 200]}]</answer>', [(100, 200, 300, 400)], [None]),
        # other key names seen in fine-tuned grounders
        ('<answer>[{"bbox": [1, 2, 3, 4], "category": "plane"}]</answer>', [(1, 2, 3, 4)], ["plane"]),
        # truncated JSON: the bare list inside is still read
        ('<answer>[{"bbox_2d": [11, 22, 33, 44], "label": "airpl', [(11, 22, 33, 44)], [None]),
        # negative and exponent numbers are numbers
        ("<answer>[-5, 2e1, 3.5E+1, 40]</answer>", [(-5, 20, 35, 40)], [None]),
    ],
)
def test_answer_shapes(text, boxes, labels):
    r = parse_reasoning(text)
    assert r.boxes == [tuple(float(v) for v in b) for b in boxes]
    assert r.labels == labels and r.box_scale == PIXELS


def test_think_without_answer_tags_answers_with_what_follows():
    r = parse_reasoning("<think>look left</think>\nThe tank is at [1, 2, 3, 4].")
    assert r.reasoning == "look left" and r.answer == "The tank is at [1, 2, 3, 4]."
    assert r.boxes == [(1.0, 2.0, 3.0, 4.0)] and not r.well_formed


def test_a_prompt_that_opened_the_block():
    r = parse_reasoning("left side.</think>\n<answer>[1, 2, 3, 4]</answer>")
    assert r.reasoning == "left side." and r.boxes == [(1.0, 2.0, 3.0, 4.0)] and r.well_formed
    cut = parse_reasoning("still thinking about [1, 2, 3, 4]", prompt_open=True)
    assert cut.reasoning == "still thinking about [1, 2, 3, 4]" and cut.boxes == [] and not cut.well_formed
    assert parse_reasoning("[1, 2, 3, 4]").reasoning is None  # without prompt_open it is a plain answer


def test_numbers_in_the_reasoning_are_not_boxes():
    r = parse_reasoning("<think>maybe [0, 0, 5, 5]? no.</think><answer>[10, 10, 20, 20]</answer>")
    assert r.boxes == [(10.0, 10.0, 20.0, 20.0)]
    cut = parse_reasoning("<think>the tank is near [100, 100, 200, 200] but")  # cut by the budget
    assert cut.boxes == [] and cut.answer == "<think>the tank is near [100, 100, 200, 200] but"
    assert cut.reasoning == "the tank is near [100, 100, 200, 200] but" and not cut.well_formed


def test_an_answer_cut_before_its_closing_tag_and_an_unclosed_think():
    r = parse_reasoning("<think>ok</think><answer>[1, 2, 3, 4]")
    assert r.answer == "[1, 2, 3, 4]" and r.boxes == [(1.0, 2.0, 3.0, 4.0)] and not r.well_formed
    r = parse_reasoning("<think>ok <answer>[1, 2, 3, 4]</answer>")
    assert r.reasoning == "ok" and r.boxes == [(1.0, 2.0, 3.0, 4.0)] and not r.well_formed


def test_text_outside_the_tags_is_not_well_formed():
    assert not parse_reasoning("Sure! " + R1).well_formed
    assert not parse_reasoning(R1 + " Hope this helps").well_formed
    assert parse_reasoning("<answer>[1, 2, 3, 4]</answer>").well_formed  # no think block: fine (think off)


def test_qwen2_vl_box_tokens_are_on_the_1000_scale():
    text = (
        "<|object_ref_start|>the bridge<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|> and "
        "<|box_start|>(900, 950),(800,900)<|box_end|>"
    )
    r = parse_reasoning(text)
    assert r.box_scale == NORM_1000
    assert r.boxes == [(100.0, 200.0, 300.0, 400.0), (800.0, 900.0, 900.0, 950.0)]
    assert r.labels == ["the bridge", None]
    # 0-1000 of the original: the resized size plays no part
    assert map_boxes(r, (756, 1008), (750, 1000)) == [(100.0, 150.0, 300.0, 300.0), (800.0, 675.0, 900.0, 712.5)]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "I cannot find it.",
        "<answer></answer>",
        "<answer>[1, 2, 3]</answer>",
        "<answer>[1, 2, three, 4]</answer>",
        '<answer>[{"bbox_2d": [1, 2, 3]}]</answer>',
        '<answer>[{"bbox_2d": "1,2,3,4"}]</answer>',
        '<answer>{"bbox_2d": [NaN, 1, 2, 3]}</answer>',
        '<answer>{"bbox_2d": [1e999, 1, 2, 3]}</answer>',
        '<answer>{"bbox_2d": [true, 1, 2, 3]}</answer>',
        "<answer>" + "[" * 50_000 + "</answer>",
        "<answer>" + "[1," * 5_000 + "</answer>",
        "<|box_start|>(1,2)<|box_end|>",
        "</answer><answer><think></think>",
        "\x00\ufffd<think><think></think></think>",
    ],
)
def test_malformed_output_is_raw_text_without_boxes(text):
    r = parse_reasoning(text)
    assert isinstance(r, Reasoning) and r.raw == text and r.boxes == [] and r.labels == []


def test_no_string_raises():
    """Random strings over the characters answers are made of: never an exception, boxes always ordered."""
    rng = random.Random(0)
    alphabet = [*'[]{},:"0123456789.-e ', "<think>", "</think>", "<answer>", "</answer>", "bbox_2d", "```json"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        r = parse_reasoning(text)
        assert len(r.boxes) == len(r.labels)
        assert all(b[0] <= b[2] and b[1] <= b[3] for b in r.boxes)


def test_smart_resize_sizes():
    assert smart_resize(750, 1000) == (756, 1008)
    assert smart_resize(512, 512) == (504, 504)
    assert smart_resize(20, 20) == (56, 56)  # raised to min_pixels
    h, w = smart_resize(10_000, 20_000, max_pixels=1280 * 28 * 28)  # lowered to max_pixels, ratio kept
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 1280 * 28 * 28 and abs(w / h - 2) < 0.05
    with pytest.raises(ImageError, match="aspect ratio"):
        smart_resize(1, 500)


def test_boxes_map_back_to_the_original_pixels():
    # original 1000x750 (w x h), resized by smart_resize to 1008x756
    resized, original = smart_resize(750, 1000), (750, 1000)
    r = parse_reasoning('<answer>[{"bbox_2d": [100.8, 75.6, 504, 378]}, {"bbox_2d": [0, 0, 1008, 756]}]</answer>')
    got = map_boxes(r, resized, original)
    assert got[0] == pytest.approx((100.0, 75.0, 500.0, 375.0))
    assert got[1] == pytest.approx((0.0, 0.0, 1000.0, 750.0))
    # a downscaled input (max_pixels): 4000x3000 seen as 1316x980 -> scale each axis on its own
    assert map_box((658, 490, 1316, 980), (980, 1316), (3000, 4000)) == pytest.approx((2000.0, 1500.0, 4000.0, 3000.0))


def test_mapped_boxes_are_clipped_to_the_image():
    assert map_box((-20, -5, 2000, 900), (756, 1008), (750, 1000)) == pytest.approx((0.0, 0.0, 1000.0, 750.0))
    assert map_box((1100, 800, 1200, 900), (756, 1008), (750, 1000)) == (1000.0, 750.0, 1000.0, 750.0)
    with pytest.raises(ValueError):
        map_box((1, 2, 3, 4), (0, 10), (10, 10))
    with pytest.raises(ValueError):
        map_box((1, 2, 3, 4), (10, 10), (10, 10), scale="0-100")
