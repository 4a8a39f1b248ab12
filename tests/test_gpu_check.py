"""The GPU script (scripts/gpu_check.py) run on the CPU against a tiny checkpoint, so it works before the
GPU machine is at hand: every stage runs, the bundles it exports agree with the reference, and its
benchmark child and roofline arithmetic produce their figures."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_stages_run_and_agree_with_the_reference(gpu_check, tiny_checkpoint, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RSEDGE_GPU_WORK", str(tmp_path / "work"))
    results = gpu_check.run(tmp_path / "out", "cpu", new_tokens=4, skip_full=True, demo=tiny_checkpoint, full=None)
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v]
    assert not failed, {k: results[k]["error"] for k in failed}
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["finished"]
    fp16, int8 = results["demo_parity_fp16"], results["demo_parity_int8"]
    assert fp16["of"] == len(gpu_check.CASES)
    assert fp16["cosine_min"] > 0.999 and fp16["greedy_agreement"] > 0.95
    assert int8["cosine_min"] > 0.99
    assert results["demo_parity_int4"]["cosine_min"] > 0.9
    manifest = json.loads((tmp_path / "work" / "demo" / "int4" / "manifest.json").read_text())
    assert manifest["compute_dtype"] == "fp16" and manifest["graphs"]["decoder"]["attention"] == "gqa"


def test_bench_child_and_roofline(gpu_check, tiny_bundle) -> None:
    bench = gpu_check.bench_in_fresh_process(tiny_bundle, "cpu", 4)
    assert bench["prompt_tokens"] > 64 and bench["decode_ms_median"] > 0 and bench["peak_rss_mb"] > 0
    roof = gpu_check.roofline(tiny_bundle, bench["prompt_tokens"], 1e12, "NVIDIA H200")
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    text = manifest["model"]["text"]
    hd = text["hidden_size"] // text["num_attention_heads"]
    kv = text["num_hidden_layers"] * 2 * text["num_key_value_heads"] * bench["prompt_tokens"] * hd * 4
    assert roof["kv_bytes"] == kv
    files = manifest["files"]
    assert roof["weights_bytes"] < files["decoder_shared.bin"]["bytes"] + files["decoder_expert0.bin"]["bytes"]
    assert roof["roofline_ms_measured_bw"] == pytest.approx(roof["bytes_per_token"] / 1e12 * 1e3, abs=1e-4)


def test_reference_bench_runs(gpu_check, tiny_checkpoint) -> None:
    ref = gpu_check.bench_reference(tiny_checkpoint, "cpu", 4)
    assert ref["prompt_tokens"] > 64 and ref["decode_ms_median"] > 0 and ref["hf_generate_s"] > 0
