"""``rsedge parity`` for UniRS bundles: an FP32 bundle agrees with the reference exactly; quantized bundles get the
free-text metric columns (accuracy, BLEU-4, CIDEr-D), against ground truth and against the reference's answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from rsedge.calibration.unirs_set import rs_default_unirs
from rsedge.cli import main
from rsedge.errors import OptionError
from rsedge.models.unirs import export, make_checkpoint
from rsedge.parity.report import parity_report

TASKS = {"cap", "vqa", "ccd", "video"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("unirs_parity")


@pytest.fixture(scope="module")
def checkpoint(root) -> Path:
    ckpt = make_checkpoint(root / "ckpt", size="tiny", seed=31)
    cfg = json.loads((ckpt / "config.json").read_text())  # 3-frame clips: a video test, not a long prefill
    (ckpt / "config.json").write_text(json.dumps({**cfg, "num_video_frames": 3}, indent=2))
    return ckpt


@pytest.fixture(scope="module")
def bundles(root, checkpoint) -> dict[str, Path]:
    calib = rs_default_unirs(size=4).save(root / "calib").root  # the INT8 vision graph's calibration, kept small
    out = {}
    for precision in ("fp32", "int8", "int4"):
        out[precision] = root / precision
        options = {} if precision == "fp32" else {"block_size": 32, "calibration": str(calib)}
        export(checkpoint, out[precision], precision=precision, **options)
    return out


def _in_range(scores: dict) -> None:
    for name, value in scores.items():
        if name == "cider":
            assert 0.0 <= value <= 10.0, (name, value)
        elif name != "n":
            assert 0.0 <= value <= 1.0, (name, value)


def test_fp32_agrees_exactly_and_int4_has_every_metric_column(checkpoint, bundles):
    res = parity_report([bundles["fp32"], bundles["int4"]], checkpoint, per_task=1)
    assert res["architecture"] == "unirs" and res["data"] == "real-test" and res["samples"] == 4
    ref, fp32, q4 = res["rows"]
    assert [r["label"] for r in res["rows"]] == ["fp32 reference", "fp32", "int4 b32"]
    assert fp32["greedy_token_agreement"] == 1.0 and fp32["exact_answer_match"] == 1.0
    assert fp32["logits_cosine"] > 0.999999 and fp32["vision"]["sqnr_db"] > 60
    assert fp32["metrics"] == ref["metrics"]
    assert set(fp32["agreement"]) == TASKS
    for task, scores in fp32["agreement"].items():
        assert scores["exact"] == 1.0, task
        if task in ("vqa", "video"):
            assert scores["accuracy"] == 1.0
    # Ground truth where the data has it: VQA and clip classes by accuracy, change captions by BLEU-4 / CIDEr-D.
    assert set(ref["metrics"]) == {"vqa", "ccd", "video"}
    for row in (ref, fp32, q4):
        assert set(row["metrics"]["ccd"]) == {"n", "bleu4", "cider"}
        assert "accuracy" in row["metrics"]["vqa"] and "accuracy" in row["metrics"]["video"]
        _in_range({k: v for t in row["metrics"].values() for k, v in t.items()})
    assert set(q4["agreement"]) == TASKS
    for scores in q4["agreement"].values():
        _in_range(scores)
    assert 0.5 < q4["logits_cosine"] < 1.0 and q4["size"]["decoder_mb"] < fp32["size"]["decoder_mb"]
    assert ref["prefill_ms_median"] > 0 and q4["peak_memory"]["peak_rss_mb"] > 0
    assert json.loads((bundles["int4"] / "manifest.json").read_text())["model"]["num_video_frames"] == 3
    assert {t["task"] for t in res["targets"]} == {"vqa", "ccd", "video"}


def test_cli_parity_exits_zero_for_an_int8_bundle(checkpoint, bundles, tmp_path):
    out, page = tmp_path / "parity.json", tmp_path / "parity.html"
    args = ["parity", str(bundles["int8"]), "--reference", str(checkpoint), "--per-task", "1", "--json", str(out),
            "--report", str(page)]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "video accuracy" in page.read_text() and "ccd bleu4" in page.read_text()
    report = json.loads(out.read_text())
    q8 = report["rows"][1]
    assert q8["precision"] == "int8" and set(q8["agreement"]) == TASKS
    assert set(q8["metrics"]) == {"vqa", "ccd", "video"}
    _in_range({k: v for t in q8["metrics"].values() for k, v in t.items()})


def test_a_bundle_of_another_architecture_and_unknown_data_are_refused(checkpoint, bundles, tiny_bundle):
    with pytest.raises(OptionError, match=r"is a rsunivlm bundle; the reference .* is a unirs checkpoint"):
        parity_report([tiny_bundle], checkpoint)
    with pytest.raises(OptionError, match="unknown evaluation data 'synthetic-test' for UniRS"):
        parity_report([bundles["fp32"]], checkpoint, data="synthetic-test")
