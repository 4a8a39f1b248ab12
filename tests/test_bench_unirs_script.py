"""scripts/bench_unirs_full.sh, which the lead runs at full size on a quiet machine, run tiny: it makes the
checkpoint, exports INT4 for the cpu target and FP16, reports decoder sizes from the manifests, and times decoding
against the PyTorch reference and a whole request built by the bundle's own family (vicuna_v1, not ChatML)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from rsedge.calibration.unirs_set import rs_default_unirs
from rsedge.runtime.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_the_full_size_script_runs_tiny(tmp_path):
    calib = rs_default_unirs(size=4).save(tmp_path / "calib").root  # the INT8 vision graph's, kept small
    env = {**os.environ, "SIZE": "tiny", "THREADS": "1", "PROMPT_TOKENS": "16", "STEPS": "4", "NEW_TOKENS": "4",
           "CALIBRATION": str(calib), "PYTHON": sys.executable}  # fmt: skip
    out = tmp_path / "bench"
    res = subprocess.run(["bash", str(ROOT / "scripts" / "bench_unirs_full.sh"), str(out)], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=900)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    sizes = json.loads((out / "sizes.json").read_text())
    # Tiny, the fused INT4 graph's fixed rotary table outweighs its weights: the sizes are checked against the files
    # on disk here, and compared at full size by whoever runs it.
    for name in ("int4", "fp16"):
        on_disk = [p for p in (out / name).iterdir() if p.name.startswith("decoder_")]
        twin = sum(p.stat().st_size for p in on_disk if p.name.startswith("decoder_prefill"))
        assert sizes[name]["decoder_mb"] == round((sum(p.stat().st_size for p in on_disk) - twin) / 1e6, 2)
        assert sizes[name]["prefill_twin_mb"] == round(twin / 1e6, 2)
    assert sizes["int4"]["prefill_twin_mb"] > 0 and sizes["fp16"]["prefill_twin_mb"] == 0  # --target cpu adds it
    assert sizes["int4_vs_fp16_decoder"] == round(sizes["int4"]["decoder_mb"] / sizes["fp16"]["decoder_mb"], 4)
    manifest = json.loads((out / "int4" / "manifest.json").read_text())
    assert manifest["architecture"] == "unirs" and manifest["precision"] == "int4"
    assert manifest["graphs"]["vision"]["quantized"] == "int8-qdq" and manifest["calibration"]["items"] == 4
    decode = json.loads((out / "decode_int4.json").read_text())
    engines = [r["engine"] for r in decode["results"]]
    assert engines == ["rsedge runtime (onnxruntime)", "PyTorch reference (eager fp32)"]
    assert decode["prompt_tokens"] == 16 and decode["runtime_vs_reference_decode_speedup"] > 0
    # The request's prompt as the UniRS family builds it: BOS, vicuna_v1 around one 196-token block.
    request = json.loads((out / "request_int4.json").read_text())
    family = Pipeline.load(out / "int4").family
    ids = family.prompt_ids("Describe this image briefly.", 1)
    assert request["prompt_tokens"] == len(ids) - 1 + manifest["model"]["tokens_per_image"]
    assert "decode speed-up INT4 runtime vs PyTorch reference" in res.stdout
    assert f"decoder: INT4 {sizes['int4']['decoder_mb']:.1f} MB vs FP16" in res.stdout
