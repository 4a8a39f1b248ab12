"""Task metrics on hand-checked cases (every expected number is worked out in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rsedge.metrics import (
    TaskReport,
    bleu,
    bleu4,
    box_iou,
    caption_scores,
    cider_d,
    cider_d_scores,
    class_ious,
    class_miou,
    exact_match_accuracy,
    grounding_accuracy,
    normalize_answer,
    segmentation_iou,
    segmentation_miou,
    tokenize_caption,
)

# ---- grounding ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
        ([0, 0, 10, 10], [5, 5, 15, 15], 25 / 175),  # 5x5 overlap; union 100 + 100 - 25
        ([0, 0, 10, 10], [0, 0, 10, 5], 0.5),  # contained half
        ([0, 0, 10, 10], [10, 0, 20, 10], 0.0),  # touching edges only
        ([0, 0, 0, 0], [0, 0, 0, 0], 0.0),  # empty union
    ],
)
def test_box_iou(a, b, expected) -> None:
    assert box_iou(a, b) == pytest.approx(expected)
    assert box_iou(b, a) == pytest.approx(expected)


def test_box_iou_rejects_bad_boxes() -> None:
    with pytest.raises(ValueError):
        box_iou([10, 0, 0, 10], [0, 0, 10, 10])
    with pytest.raises(ValueError):
        box_iou([0, 0, 10], [0, 0, 10, 10])


def test_grounding_accuracy_hits_misses_and_unparsable() -> None:
    target = [10, 10, 50, 50]  # 40 x 40 = 1600
    predictions = [
        "[10, 10, 50, 50]",  # IoU 1: hit
        "The tank is at [10, 10, 50, 30].",  # 40 x 20 inside: 800 / 1600 = 0.5, hit (>= threshold)
        "[10, 10, 50, 29]",  # 760 / 1600 = 0.475: miss
        "I cannot find it.",  # no box: miss
        "[60, 60, 90, 90] and [10, 10, 50, 50]",  # only the first box counts: IoU 0, miss
        "[50, 50, 10, 10]",  # corners swapped, parse_boxes orders them: hit
    ]
    targets = [target] * len(predictions)
    assert grounding_accuracy(predictions, targets) == pytest.approx(3 / 6)
    assert grounding_accuracy(predictions, targets, threshold=0.45) == pytest.approx(4 / 6)
    assert grounding_accuracy(["[0, 0, 100, 100]"], [[0, 0, 100, 100]]) == 1.0
    assert grounding_accuracy(["[1, 2]"], [[0, 0, 100, 100]]) == 0.0  # too few numbers: no box


def test_grounding_accuracy_checks_lengths() -> None:
    with pytest.raises(ValueError):
        grounding_accuracy(["[0, 0, 1, 1]"], [])
    with pytest.raises(ValueError):
        grounding_accuracy([], [])


# ---- exact match -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" Three. ", "3"),
        ("Yes", "yes"),
        ("Residential   Area.", "residential area"),
        ("twenty-one", "21"),
        ("twenty one cars", "21 cars"),
        ("forty", "40"),
        ("zero", "0"),
        ("3.5", "3.5"),
        ("someone", "someone"),
    ],
)
def test_normalize_answer(text, expected) -> None:
    assert normalize_answer(text) == expected


def test_exact_match_accuracy() -> None:
    predictions = ["Three.", " yes ", "Dense residential.", "no", "3 cars", "Nineteen"]
    targets = ["3", "Yes", "dense residential", "yes", "three", "19"]
    # hits: 1, 2, 3, 6; misses: "no" != "yes", "3 cars" != "3"
    assert exact_match_accuracy(predictions, targets) == pytest.approx(4 / 6)
    with pytest.raises(ValueError):
        exact_match_accuracy(["a"], ["a", "b"])


# ---- segmentation ------------------------------------------------------------------------------

BUILDING = (np.array([[0, 1, 1, 0], [0, 1, 1, 0]], dtype=np.uint8), ["others", "building"])
EMPTY = (np.zeros((2, 4), dtype=np.uint8), ["others", "building"])


def test_segmentation_iou_by_hand() -> None:
    grid, labels = BUILDING
    # predicted row 0 cols 1-3, row 1 nothing: intersection 2, union 4 + 3 - 2 = 5
    assert segmentation_iou("others*1, building*3\nothers*4", grid, labels) == pytest.approx(2 / 5)
    # exact answer
    assert segmentation_iou("others*1, building*2, others*1\nothers*1, building*2, others*1", grid, labels) == 1.0
    # empty prediction against empty target
    assert segmentation_iou("others*4\nothers*4", *EMPTY) == 1.0
    # empty prediction against a non-empty target
    assert segmentation_iou("others*4\nothers*4", grid, labels) == 0.0
    # unparsable answers score 0, even against an empty target
    assert segmentation_iou("no mask here", grid, labels) == 0.0
    assert segmentation_iou("", *EMPTY) == 0.0


def test_segmentation_iou_resizes_prediction_nearest() -> None:
    grid, labels = BUILDING
    # a 1x2 grid "building | others" grows to 2x4 with the left two columns foreground (4 px);
    # intersection with the target: column 1 of both rows = 2; union 4 + 4 - 2 = 6
    assert segmentation_iou("building*1, others*1", grid, labels) == pytest.approx(2 / 6)


def test_segmentation_iou_per_label() -> None:
    grid = np.array([[1, 2], [2, 0]], dtype=np.uint8)
    labels = ["others", "building", "road"]
    answer = "building*2\nroad*1, others*1"
    # building: target {(0,0)}, predicted {(0,0), (0,1)} -> 1/2
    assert segmentation_iou(answer, grid, labels, "building") == pytest.approx(0.5)
    # road: target {(0,1), (1,0)}, predicted {(1,0)} -> 1/2
    assert segmentation_iou(answer, grid, labels, "road") == pytest.approx(0.5)
    assert segmentation_iou(answer, grid, labels, "Road") == pytest.approx(0.5)  # case-insensitive
    # foreground: the same three pixels on both sides -> 1
    assert segmentation_iou(answer, grid, labels) == 1.0


def test_segmentation_miou_mean_over_samples() -> None:
    predictions = ["others*1, building*3\nothers*4", "others*4\nothers*4", "garbage", "building*1, others*1"]
    targets = [BUILDING, EMPTY, BUILDING, BUILDING]
    # per sample: 2/5, 1 (empty vs empty), 0 (unparsable), 1/3 (resized) -> mean 26/60
    assert segmentation_miou(predictions, targets) == pytest.approx((0.4 + 1.0 + 0.0 + 1 / 3) / 4)


def test_class_miou_sums_over_the_dataset() -> None:
    sample_a = (np.array([[1, 2], [2, 0]], dtype=np.uint8), ["others", "building", "road"])
    sample_b = (np.array([[1, 1], [0, 0]], dtype=np.uint8), ["others", "Building"])
    predictions = ["building*2\nroad*1, others*1", "others*2\nothers*2"]
    # building: A I=1 U=2, B I=0 U=2 -> 1/4; road: A I=1 U=2, absent from B -> 1/2
    assert class_ious(predictions, [sample_a, sample_b]) == pytest.approx({"building": 0.25, "road": 0.5})
    assert class_miou(predictions, [sample_a, sample_b]) == pytest.approx(0.375)
    # the per-sample definition differs: foreground IoU A = 1, B = 0 -> 0.5
    assert segmentation_miou(predictions, [sample_a, sample_b]) == pytest.approx(0.5)
    # an unparsable answer adds its target pixels to the union: road I=1, U=2+2
    sample_c = (np.array([[2, 2], [0, 0]], dtype=np.uint8), ["others", "building", "road"])
    ious = class_ious([*predictions, "???"], [sample_a, sample_b, sample_c])
    assert ious == pytest.approx({"building": 0.25, "road": 0.25})
    # an explicit class list; "others" scores the background: A I=1 U=1, B I=2 U=4 -> 3/5
    assert class_ious(predictions, [sample_a, sample_b], classes=["others"]) == pytest.approx({"others": 0.6})


def test_class_miou_nothing_anywhere_is_one() -> None:
    assert class_miou(["others*4\nothers*4"], [EMPTY]) == 1.0


def test_segmentation_rejects_bad_targets() -> None:
    with pytest.raises(ValueError):
        segmentation_iou("others*1", np.array([[0, 5]]), ["others", "building"])
    with pytest.raises(ValueError):
        segmentation_iou("others*1", np.array([0, 1]), ["others", "building"])


# ---- captions ----------------------------------------------------------------------------------


def test_tokenize_caption() -> None:
    assert tokenize_caption("  A new Road, built near the river.") == [
        "a",
        "new",
        "road",
        "built",
        "near",
        "the",
        "river",
    ]


def test_bleu4_identical_is_one() -> None:
    references = [["a new road was built"], ["two buildings were removed near the lake"]]
    predictions = ["A new road was built.", "two buildings were removed near the lake"]
    assert bleu4(predictions, references) == pytest.approx(1.0, abs=1e-9)


def test_bleu4_no_four_gram_overlap_is_zero() -> None:
    # p1 = 4/5, p2 = 2/4, p3 = 1/3 but no 4-gram matches; coco-caption's smoothing leaves
    # (0.8 * 0.5 / 3 * 1e-15 / 2) ** 0.25 ~ 9e-5 instead of an exact 0
    scores = bleu(["the river is wide today"], [["the river is narrow today"]])
    assert scores[:3] == pytest.approx([0.8, math.sqrt(0.8 * 0.5), (0.8 * 0.5 / 3) ** (1 / 3)])
    assert 0 <= scores[3] < 1e-3


def test_bleu4_hand_computed_with_brevity_penalty() -> None:
    predictions = ["a new road is built near the river", "trees were removed"]
    references = [["a new road is built along the river"], ["many trees were removed", "some trees were cut down here"]]
    # sample 1 (8 words): matches 1-4 grams 7/8, 5/7, 3/6, 2/5
    # sample 2 (3 words): 3/3, 2/2, 1/1, 0/0; closest reference length 4 (not 6)
    # corpus: 10/11, 7/9, 4/7, 2/5 -> product 560 / 3465 = 16 / 99; c = 11, r = 8 + 4 = 12
    # BLEU-4 = exp(1 - 12/11) * (16/99) ** (1/4) = 0.913101 * 0.634046 = 0.578948
    expected = math.exp(1 - 12 / 11) * (16 / 99) ** 0.25
    assert bleu4(predictions, references) == pytest.approx(expected, rel=1e-8)
    assert expected == pytest.approx(0.578948, abs=1e-6)
    assert bleu(predictions, references)[0] == pytest.approx(math.exp(1 - 12 / 11) * 10 / 11, rel=1e-8)


# CIDEr-D toy corpus (N = 2 samples, so idf = log 2 - log df = L = log 2 for df = 1, and 0 for
# "the", which both samples' references hold; an n-gram in no reference also gets idf L).
#
# Sample 1, candidate "the road widened", refs "the road widened" / "the road ended":
#   unigrams: the 0, road L, widened L. Ref 1 is identical -> cosine 1 for n = 1, 2, 3, 0 for n = 4.
#   Ref 2: unigram dot road*road = L^2 over norms sqrt(2)L * sqrt(2)L -> 1/2; bigrams "the road"
#   shared -> 1/2; trigram none -> 0. Lengths equal (no penalty).
#   Sum over refs per n: [1.5, 1.5, 1, 0] -> mean over n 1.0 -> / 2 refs -> 0.5 -> x10 = 5.0.
# Sample 2, candidate "trees trees", ref "the trees":
#   unigram trees tf 2 -> 2L; clipped dot min(2L, L) * L = L^2 over norms 2L * L -> 1/2
#   (1 without clipping); bigram "trees trees" vs "the trees" -> 0. Equal lengths.
#   -> 0.5 / 4 * 10 = 1.25.
# CIDEr-D = (5.0 + 1.25) / 2 = 3.125.
CIDER_PREDICTIONS = ["The road widened.", "trees trees"]
CIDER_REFERENCES = [["the road widened", "the road ended"], ["the trees"]]


def test_cider_d_hand_computed() -> None:
    assert cider_d_scores(CIDER_PREDICTIONS, CIDER_REFERENCES) == pytest.approx([5.0, 1.25])
    assert cider_d(CIDER_PREDICTIONS, CIDER_REFERENCES) == pytest.approx(3.125)


def test_cider_d_length_penalty() -> None:
    # candidate "trees trees trees": unigram 3L, clipped dot L^2 over 3L * L -> 1/3; one word longer
    # than the reference, so the Gaussian penalty is exp(-1 / (2 * 6^2)) = exp(-1/72)
    # -> 1/3 * exp(-1/72) / 4 * 10 = 0.821839; document frequencies come from references only
    scores = cider_d_scores(["the road widened", "trees trees trees"], CIDER_REFERENCES)
    assert scores == pytest.approx([5.0, 10 / 12 * math.exp(-1 / 72)])
    assert scores[1] == pytest.approx(0.821839, abs=1e-6)


def test_cider_d_needs_a_corpus() -> None:
    # a single sample: every idf is log 1 - log 1 = 0
    assert cider_d(["the trees"], [["the trees"]]) == 0.0


def test_caption_scores_keys_and_validation() -> None:
    scores = caption_scores(CIDER_PREDICTIONS, CIDER_REFERENCES)
    assert set(scores) == {"bleu4", "cider"}
    assert scores["cider"] == pytest.approx(3.125)
    with pytest.raises(ValueError):
        caption_scores(["a"], ["a"])  # references must be lists of strings
    with pytest.raises(ValueError):
        caption_scores(["a"], [[]])


# ---- TaskReport --------------------------------------------------------------------------------


def test_task_report_groups_and_scores() -> None:
    grid, labels = BUILDING
    report = TaskReport(
        [
            ("vg", "[10, 10, 50, 50]", {"box": [10, 10, 50, 50]}),
            ("vg", "nothing", {"box": [10, 10, 50, 50]}),
            ("seg", "others*1, building*3\nothers*4", {"grid": grid, "labels": labels}),
            ("cseg", "others*4\nothers*4", {"grid": EMPTY[0], "labels": EMPTY[1]}),
            ("vqa", "Three.", {"answer": "3"}),
            ("cls", "forest", {"answer": "river"}),
        ]
    )
    for prediction, references in zip(CIDER_PREDICTIONS, CIDER_REFERENCES, strict=True):
        report.add("ccd", prediction, {"references": references})
    report.add("ref", "a new road is built near the river", {"references": ["a new road is built near the river"]})
    assert len(report) == 9
    result = report.compute()
    assert list(result) == ["vg", "seg", "cseg", "vqa", "cls", "ccd", "ref"]
    assert result["vg"] == {"n": 2, "acc@0.5": 0.5}
    assert result["seg"] == pytest.approx({"n": 1, "miou": 0.4, "class_miou": 0.4})
    assert result["cseg"] == {"n": 1, "miou": 1.0, "class_miou": 1.0}
    assert result["vqa"] == {"n": 1, "accuracy": 1.0}
    assert result["cls"] == {"n": 1, "accuracy": 0.0}
    assert result["ccd"]["cider"] == pytest.approx(3.125)
    assert result["ref"]["bleu4"] == pytest.approx(1.0, abs=1e-9)


def test_task_report_per_sample_label() -> None:
    grid = np.array([[1, 2], [2, 0]], dtype=np.uint8)
    target = {"grid": grid, "labels": ["others", "building", "road"], "label": "building"}
    result = TaskReport([("seg", "building*2\nroad*1, others*1", target)]).compute()
    assert result["seg"]["miou"] == pytest.approx(0.5)


def test_task_report_validates_input() -> None:
    report = TaskReport()
    with pytest.raises(ValueError, match="unknown task"):
        report.add("det", "x", {})
    with pytest.raises(ValueError, match="box"):
        report.add("vg", "[0, 0, 1, 1]", {"answer": "x"})
    with pytest.raises(TypeError):
        report.add("vqa", None, {"answer": "x"})  # type: ignore[arg-type]
    assert report.compute() == {}
