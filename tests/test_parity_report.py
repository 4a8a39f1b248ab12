"""The parity report: an FP32 bundle reproduces the reference exactly; a quantized one is measured, not assumed."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rsedge.export.bundle import export_bundle
from rsedge.parity.html import render
from rsedge.parity.report import cosine, parity_report, sqnr_db, token_agreement


def test_sqnr_and_agreement_by_hand():
    ref = np.array([3.0, 4.0])
    assert sqnr_db(ref, ref) == math.inf
    assert sqnr_db(ref, ref + np.array([0.3, 0.4])) == pytest.approx(20.0)  # |ref| / |noise| = 10
    assert cosine(ref, 2 * ref) == pytest.approx(1.0)
    assert token_agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == 0.5
    assert token_agreement([[1, 2], [5]], [[1, 2], [5]]) == 1.0


def test_fp32_bundle_matches_reference_and_int4_is_measured(tiny_checkpoint, tiny_bundle, tmp_path):
    int4 = tmp_path / "int4"
    # standard attention: the fused form adds a fixed-size rotary table that dwarfs this tiny decoder
    export_bundle(tiny_checkpoint, int4, precision="int4", block_size=32, attention="standard")
    res = parity_report([tiny_bundle, int4], tiny_checkpoint, data="synthetic-test", per_task=1, baselines=False)
    ref, fp32, q4 = res["rows"]
    assert fp32["greedy_token_agreement"] == 1.0
    assert fp32["logits_cosine"] > 0.999999
    assert fp32["metrics"] == ref["metrics"]
    assert fp32["vision"]["sqnr_db"] > 60
    assert q4["size"]["decoder_mb"] < 0.4 * fp32["size"]["decoder_mb"]
    for row in (fp32, q4):  # measured in a runtime-only child process: above its own import floor
        mem = row["peak_memory"]
        assert mem["peak_rss_mb"] > mem["rss_before_load_mb"] > 10 and mem["peak_over_floor_mb"] > 0
    assert 0.5 < q4["logits_cosine"] < 1.0
    assert [r["label"] for r in res["rows"]] == ["fp32 reference", "fp32", "int4 b32"]
    # the reference is timed as the bundles are: its prompt pass apart from its one-token steps
    assert ref["prefill_ms_median"] > 0 and ref["decode_ms_per_token"] > 0
    page = render(res)
    assert "<svg" in page and "int4 b32" in page and "Fidelity targets" in page
    targets = [t for t in res["targets"] if t["precision"] == "int4"]
    assert {t["task"] for t in targets} == set(ref["metrics"])
    for t in targets:
        metric = q4["metrics"][t["task"]][t["metric"]] - ref["metrics"][t["task"]][t["metric"]]
        assert t["delta_pts"] == pytest.approx(100 * metric)
        assert t["met"] == (abs(t["delta_pts"]) <= 1.5 + 1e-9)


def test_fidelity_targets_name_the_miss_and_its_size():
    from rsedge.parity.report import describe_miss, fidelity_targets

    def row(precision, vqa, cap, changed=None):
        r = {
            "name": f"/b/{precision}",
            "precision": precision,
            "metrics": {"vqa": {"accuracy": vqa}, "cap": {"bleu4": cap}},
        }
        if precision != "fp32-reference":
            r |= {"size": {}, "vision": {"sqnr_db": 40.0}, "logits_sqnr_db": 25.0, "changed_answers": changed}
        return r

    rows = [
        row("fp32-reference", 0.80, 0.500),
        row("int8", 0.80, 0.504, {"vqa": [0, 25], "cap": [1, 25]}),
        row("int4", 0.76, 0.490, {"vqa": [1, 25], "cap": [6, 25]}),
    ]
    got = {(t["precision"], t["task"]): t for t in fidelity_targets(rows)}
    assert got["int8", "vqa"]["met"] and got["int8", "cap"]["met"]  # +0.4 points: inside ±0.5
    assert not got["int4", "vqa"]["met"] and got["int4", "cap"]["met"]  # -4.0 misses ±1.5; -1.0 is inside
    line = describe_miss(got["int4", "vqa"])
    assert "-4.0 pts" in line and "missed by 2.5" in line and "1 of 25 answers" in line
    assert "one answer moves accuracy by 4.0 pts at n=25" in line  # the target is finer than one answer


def test_bitsandbytes_baselines_when_available(tiny_checkpoint, tiny_bundle):
    from rsedge.parity import bnb_baseline

    if not bnb_baseline.available():
        pytest.skip("bitsandbytes is not installed (optional baseline: pip install bitsandbytes)")
    res = parity_report([tiny_bundle], tiny_checkpoint, data="synthetic-test", per_task=1)
    rows = {r["precision"]: r for r in res["rows"]}
    assert {"bnb-int8", "bnb-nf4"} <= set(rows)
    int8, nf4 = rows["bnb-int8"], rows["bnb-nf4"]
    assert nf4["decoder_linear_mb"] == pytest.approx(int8["decoder_linear_mb"] / 2)
    assert 0.5 < nf4["logits_cosine"] < 1.0 and int8["logits_cosine"] > nf4["logits_cosine"] - 0.05
    assert "bnb-nf4" in render(res)


def test_bundle_labels_tell_recipes_of_one_precision_apart():
    from rsedge.parity.report import bundle_label

    awq = {"algorithm": "awq", "decoder": {"block_size": 128}, "exclude": ["lm_head"]}
    assert bundle_label("int4", awq) == "int4 awq b128 keep lm_head"
    assert bundle_label("int4", {"algorithm": "rtn", "decoder": {"block_size": 64}, "exclude": []}) == "int4 b64"
    assert bundle_label("fp32", None) == "fp32"
    assert bundle_label("int8", {"decoder": {"block_size": 128}, "vision": "int8"}) == "int8 b128"
    assert bundle_label("int8", {"decoder": {"block_size": 128}, "vision": "model"}) == "int8 b128 vision unquantized"
    assert bundle_label("int4", {"decoder": {"block_size": 128}, "vision": "int8"}) == "int4 b128 vision int8"


def test_parity_cli_writes_json_and_report_without_baselines(tiny_checkpoint, tiny_bundle, tmp_path):
    from click.testing import CliRunner

    from rsedge.cli import main

    args = ["parity", str(tiny_bundle), "--reference", str(tiny_checkpoint), "--data", "synthetic-test"]
    args += ["--per-task", "1", "--no-baselines", "--json", str(tmp_path / "r.json")]
    args += ["--report", str(tmp_path / "r.html")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["fp32 reference", "fp32"]  # no bitsandbytes rows
    assert rows[1]["greedy_token_agreement"] == 1.0
    assert "fp32 reference" in (tmp_path / "r.html").read_text()


def test_the_reference_is_fed_as_each_bundle_is(anyres_checkpoint, anyres_bundle, tmp_path):
    """An anyres bundle and a bundle with another router match their reference exactly: the reference takes each
    bundle's preprocessing and routing (it used to run square views and the default router for every bundle)."""
    rerouted = tmp_path / "rerouted"
    export_bundle(anyres_checkpoint, rerouted, precision="fp32", router={"[SEG]": 0, "[VG]": 2, "[CAP]": 1})
    res = parity_report([anyres_bundle, rerouted], anyres_checkpoint, data="synthetic-test", per_task=1,
                        baselines=False)  # fmt: skip
    ref_a, ref_b, plain, moved = res["rows"]
    assert [r["precision"] for r in (ref_a, ref_b)] == ["fp32-reference"] * 2  # one reference run per routing
    for row, ref in ((plain, ref_a), (moved, ref_b)):
        assert row["greedy_token_agreement"] == 1.0 and row["logits_cosine"] > 0.999999
        assert row["metrics"] == ref["metrics"] and row["vision"]["sqnr_db"] > 60
    assert moved["reference_row"] == 1 and plain["reference_row"] == 0


def test_reference_generate_times_prefill_and_steps_apart(tiny_reference, tiny_checkpoint):
    from tokenizers import Tokenizer

    from rsedge.runtime.prompt import build_prompt, tokenize

    tok = Tokenizer.from_file(str(tiny_checkpoint / "tokenizer.json"))
    ids = tokenize(tok, build_prompt("[CAP] Describe.", 0))
    took: dict[str, float] = {}
    tokens, _ = tiny_reference.generate(ids, [], [], 0, 5, eos_token_id=None, timings=took)
    assert len(tokens) == 5 and took["decode_steps"] == 5 and took["prefill_ms"] > 0 and took["decode_ms"] > 0
