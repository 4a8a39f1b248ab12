"""Grounding-with-reasoning metrics (boxes mapped back, mean IoU, reasoning length) and the parity report's columns for
them, on synthetic answers."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from rsedge.demo import BUILTIN_MODEL
from rsedge.metrics import TaskReport, box_scores, mean_iou, reasoning_grounding_scores, reasoning_length
from rsedge.parity.html import render
from rsedge.parity.report import Run, reasoning_cell, reasoning_columns


def answer(box, thought="the tank on the left") -> str:
    return f'<think>{thought}</think>\n<answer>[{{"bbox_2d": {list(box)}, "label": "tank"}}]</answer>'


def test_mean_iou_and_box_scores():
    # [VG] text answers on 0-100: a hit (IoU 1), a half-overlap (IoU 1/3), no box (0)
    preds = ["[0, 0, 10, 10]", "[5, 0, 15, 10]", "no box"]
    targets = [[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]]
    assert mean_iou(preds, targets) == pytest.approx((1 + 1 / 3 + 0) / 3)
    scores = box_scores([[0, 0, 10, 10], [5, 0, 15, 10], None], targets)
    assert scores == pytest.approx({"acc@0.5": 1 / 3, "miou": (1 + 1 / 3) / 3})
    assert box_scores([[5, 0, 15, 10]], [[0, 0, 10, 10]], threshold=0.3)["acc@0.3"] == 1.0
    with pytest.raises(ValueError):
        box_scores([], [])


def test_reasoning_answers_are_scored_in_original_pixels():
    # original 1000x750 seen as 1008x756: the model's (100.8, 75.6, 504, 378) is (100, 75, 500, 375) in the image
    target = [100, 75, 500, 375]
    answers = [answer([100.8, 75.6, 504, 378]), answer([504, 378, 1008, 756]), "I think it is somewhere left."]
    got = reasoning_grounding_scores(answers, [target] * 3, [(756, 1008)] * 3, [(750, 1000)] * 3)
    assert got["acc@0.5"] == pytest.approx(1 / 3)
    assert got["miou"] == pytest.approx(1 / 3)  # second: no overlap; third: no box
    assert got["well_formed"] == pytest.approx(2 / 3)
    # the same boxes unmapped (scored in resized pixels) would miss by the scale: mapping matters
    off = reasoning_grounding_scores(answers[:1], [[0, 0, 100, 75]], [(756, 1008)], [(750, 1000)])
    assert off["acc@0.5"] == 0.0


def test_task_report_scores_vgr_and_leaves_vg_as_it_was():
    report = TaskReport()
    report.add("vg", "[0, 0, 10, 10]", {"box": [0, 0, 10, 10]})
    for box in ([100.8, 75.6, 504, 378], [0, 0, 10, 10]):
        report.add(
            "vgr", answer(box), {"box": [100, 75, 500, 375], "resized_hw": (756, 1008), "original_hw": (750, 1000)}
        )
    out = report.compute()
    assert out["vg"] == {"n": 1, "acc@0.5": 1.0}
    assert out["vgr"]["n"] == 2 and out["vgr"]["acc@0.5"] == 0.5 and out["vgr"]["well_formed"] == 1.0
    with pytest.raises(ValueError, match="resized_hw"):
        report.add("vgr", answer([1, 2, 3, 4]), {"box": [1, 2, 3, 4], "original_hw": (10, 10)})


def test_reasoning_length():
    assert reasoning_length([None, None]) is None
    assert reasoning_length([10, None, 30, 20]) == {"answers": 3, "of": 4, "mean": 20.0, "median": 20.0, "max": 30}
    assert reasoning_length([1, 4])["median"] == 2.5


def test_runs_count_reasoning_tokens_as_the_runtime_does():
    tok = Tokenizer.from_file(str(BUILTIN_MODEL / "tokenizer.json"))
    ids = tok.encode("<think>a b c</think>\n<answer>[1, 2, 3, 4]</answer>", add_special_tokens=False).ids
    run = Run("x")
    prompt = tok.encode("question", add_special_tokens=False).ids
    run.add_reasoning(tok, prompt, ids)
    run.add_reasoning(tok, prompt, tok.encode("[1, 2, 3, 4]", add_special_tokens=False).ids)  # no think block
    opened = tok.encode("question <think>\n", add_special_tokens=False).ids
    run.add_reasoning(tok, opened, tok.encode("a b c d</think><answer>x</answer>", add_special_tokens=False).ids)
    assert run.think_tokens == [len(tok.encode("a b c").ids), None, len(tok.encode("a b c d").ids)]


def synthetic_report(ref_tokens, bundle_tokens) -> dict:
    ref, got = Run("ref", think_tokens=ref_tokens), Run("b", think_tokens=bundle_tokens)
    rows = [
        {"name": "ref", "label": "fp32 reference", "precision": "fp32-reference", "metrics": {"vg": {"acc@0.5": 0.5}},
         "prefill_ms_median": 1.0, "decode_ms_per_token": 1.0, **reasoning_columns(ref)},
        {"name": "b", "label": "int4 b32", "precision": "int4", "metrics": {"vg": {"acc@0.5": 0.5}},
         "logits_cosine": 0.99, "logits_sqnr_db": 20.0, "greedy_token_agreement": 0.9, "size": {"decoder_mb": 1.0},
         "prefill_ms_median": 1.0, "decode_ms_per_token_median": 1.0, "peak_memory": {"peak_rss_mb": 10.0},
         **reasoning_columns(got, ref)},
    ]  # fmt: skip
    return {"rows": rows, "samples": 2, "data": "synthetic", "seed": 0, "targets": []}


def test_parity_shows_reasoning_columns_only_when_answers_reasoned():
    report = synthetic_report([10, 20], [30, 30])
    ref, bundle = report["rows"]
    assert bundle["reasoning_tokens"]["mean"] == 30 and bundle["reasoning_tokens_ratio"] == pytest.approx(2.0)
    assert reasoning_cell(bundle) == "30.0 (2.00x)" and reasoning_cell(ref) == "15.0"
    page = render(report)
    assert "think tok" in page and "30.0 (2.00x)" in page
    plain = synthetic_report([None, None], [None, None])
    assert not any("reasoning_tokens" in r for r in plain["rows"])
    assert "think tok" not in render(plain)
