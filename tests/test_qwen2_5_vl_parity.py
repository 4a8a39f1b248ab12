"""``rsedge parity`` for Qwen2.5-VL bundles: grounding with reasoning on the real test split's boxes, against
transformers' model fed as the family feeds the graphs.

The tiny random checkpoint neither reasons nor boxes, so its bundles are given an R1-style template that opens the
think block (``...<|im_start|>assistant\\n<think>\\n``, as reasoning models' templates do): every answer then
reasons, ``--max-think-tokens`` closes the block after N tokens (reference and bundles alike), and the reasoning
columns must appear. An FP32 bundle agrees with the reference exactly (tokens, answers, boxes, reasoning length);
INT8 / INT4 rows carry every metric column, in range. Exports and the checkpoint are shared by the module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from rsedge.cli import main
from rsedge.errors import OptionError
from rsedge.models.qwen2_5_vl import export
from rsedge.parity.qwen2_5_vl import GroundingSample, eval_samples, task_metrics
from rsedge.parity.report import parity_report
from rsedge.runtime.bundle import Bundle
from tests.qwen2_5_vl_helpers import tiny_checkpoint

THINK_TAIL = "<|im_start|>assistant\n<think>\n"
VGR_COLUMNS = {"n", "acc@0.5", "miou", "well_formed"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qwen_parity")


@pytest.fixture(scope="module")
def ckpt(root) -> Path:
    return tiny_checkpoint(root, seed=3)


def _thinking(bundle: Path, out: Path) -> Path:
    """A copy of ``bundle`` whose template opens the think block (the manifest's prompt section only)."""
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    template = manifest["prompt"]["template"]
    assert template.endswith("<|im_start|>assistant\n")
    manifest["prompt"]["template"] = template.removesuffix("<|im_start|>assistant\n") + THINK_TAIL
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


@pytest.fixture(scope="module")
def bundles(root, ckpt) -> dict[str, Path]:
    out = {}
    for precision in ("fp32", "int8", "int4"):
        options = {"block_size": 32} if precision != "fp32" else {}
        export(ckpt, root / precision, precision=precision, **options)
        out[precision] = _thinking(root / precision, root / f"{precision}-think")
    out["fp32-plain"] = root / "fp32"
    return out


def _in_range(scores: dict) -> None:
    for name, value in scores.items():
        if name != "n":
            assert 0.0 <= value <= 1.0, (name, value)


def test_fp32_agrees_exactly_and_quantized_rows_have_every_column(ckpt, bundles):
    res = parity_report([bundles["fp32"], bundles["int8"], bundles["int4"]], ckpt, per_task=2, max_think_tokens=6)
    assert res["architecture"] == "qwen2_5_vl" and res["data"] == "real-test" and res["samples"] == 2
    assert res["max_think_tokens"] == 6
    ref, fp32, q8, q4 = res["rows"]
    assert [r["label"] for r in res["rows"]] == ["fp32 reference", "fp32", "int8 b32", "int4 b32"]
    # FP32: the reference's greedy tokens, answers and boxes, its first-step logits and vision features
    assert fp32["greedy_token_agreement"] == 1.0 and fp32["exact_answer_match"] == 1.0
    assert fp32["agreement"] == {"vgr": {"n": 2, "acc@0.5": 1.0, "miou": 1.0, "exact": 1.0}}
    assert fp32["logits_cosine"] > 0.999999 and fp32["vision"]["sqnr_db"] > 60
    assert fp32["metrics"] == ref["metrics"]
    # every answer reasoned (the template opened the block) and the budget closed it after 6 tokens, in the
    # reference as in the bundles: the random model never closes it itself
    for row in res["rows"]:
        assert row["reasoning_tokens"] == {"answers": 2, "of": 2, "mean": 6.0, "median": 6.0, "max": 6}, row["label"]
    assert fp32["reasoning_tokens_ratio"] == 1.0
    for row in (ref, fp32, q8, q4):
        assert set(row["metrics"]) == {"vgr"} and set(row["metrics"]["vgr"]) == VGR_COLUMNS
        _in_range(row["metrics"]["vgr"])
    for row in (q8, q4):
        assert set(row["agreement"]["vgr"]) == {"n", "acc@0.5", "miou", "exact"}
        _in_range(row["agreement"]["vgr"])
        assert row["reasoning_tokens_ratio"] == 1.0 and 0.0 <= row["greedy_token_agreement"] <= 1.0
        assert row["peak_memory"]["peak_rss_mb"] > 0
    assert q4["size"]["decoder_mb"] < q8["size"]["decoder_mb"] < fp32["size"]["decoder_mb"]
    assert q8["vision"]["sqnr_db"] < fp32["vision"]["sqnr_db"]  # INT8's static INT8 vision graph
    assert {(t["task"], t["metric"]) for t in res["targets"]} == {("vgr", "acc@0.5")}


def test_samples_are_the_real_test_boxes_scored_in_original_pixels(bundles):
    opened = [Bundle.open(bundles["fp32"], verify="size")]
    samples = eval_samples("real-test", 25, 0, opened)
    # the split's only box: DIOR's overpass (the calibration set takes the train split), in both prompt styles
    assert len(samples) == 2 and all("overpass" in s.prompt and "<think>" in s.prompt for s in samples)
    s: GroundingSample = samples[0]
    assert s.original_hw == (512, 512) and s.resized_hw == (448, 448)  # the tiny checkpoint's max_pixels
    plain = [Bundle.open(bundles["fp32-plain"], verify="size")]
    assert s.think_open and not eval_samples("real-test", 1, 0, plain)[0].think_open
    rh, rw = s.resized_hw
    x1, y1, x2, y2 = s.box
    scaled = [round(x1 * rw / 512), round(y1 * rh / 512), round(x2 * rw / 512), round(y2 * rh / 512)]
    right = f'the overpass</think>\n<answer>[{{"bbox_2d": {scaled}, "label": "overpass"}}]</answer>'
    unscaled = f'</think><answer>[{{"bbox_2d": {[round(v) for v in s.box]}}}]</answer>'
    good = task_metrics([s], [right])["vgr"]
    assert good["acc@0.5"] == 1.0 and good["miou"] > 0.97 and good["well_formed"] == 1.0
    # the box read in original pixels without mapping back lands elsewhere: the mapping is what scores it right
    assert task_metrics([s], [unscaled])["vgr"]["miou"] < 0.9
    # cut inside its reasoning: numbers being reasoned about are no answer
    assert task_metrics([s], [f"the box may be {scaled}"])["vgr"]["acc@0.5"] == 0.0


def test_cli_parity_exits_zero_and_renders_the_reasoning_columns(ckpt, bundles, tmp_path):
    out, page = tmp_path / "parity.json", tmp_path / "parity.html"
    args = ["parity", str(bundles["int8"]), "--reference", str(ckpt), "--data", "real-test,synthetic-test",
            "--per-task", "1", "--max-think-tokens", "4", "--json", str(out), "--report", str(page)]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    html = page.read_text()
    assert all(c in html for c in ("vgr acc@0.5", "vgr miou", "vgr well_formed", "think tok (x ref)"))
    report = json.loads(out.read_text())
    assert report["samples"] == 2 and report["max_think_tokens"] == 4  # one real box, one synthetic scene
    ref, q8 = report["rows"]
    assert q8["precision"] == "int8" and q8["reasoning_tokens"]["max"] <= 4 and ref["reasoning_tokens"]["answers"] == 2
    _in_range(q8["metrics"]["vgr"])


def test_bad_requests_are_refused_in_one_line(ckpt, bundles):
    with pytest.raises(OptionError, match=r"unknown evaluation data 'real-train' for Qwen2\.5-VL"):
        parity_report([bundles["fp32"]], ckpt, data="real-train")
    with pytest.raises(OptionError, match="opens a think block and some do not"):
        parity_report([bundles["fp32"], bundles["fp32-plain"]], ckpt)
    with pytest.raises(OptionError, match="max_think_tokens must be a non-negative integer"):
        parity_report([bundles["fp32"]], ckpt, max_think_tokens=-1)
