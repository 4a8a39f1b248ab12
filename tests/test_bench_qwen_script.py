"""scripts/bench_qwen_full.sh, which the lead runs at full size on a quiet machine, run tiny: it makes the checkpoint,
exports INT4 with the INT8 vision graph in the onnxruntime form and the Jetson (jp6.1) form, reports the decoders' sizes
from the manifests against an FP16 size computed from the checkpoint's parameter count, times decoding against
transformers, and estimates the Jetson bundle on Jetson targets at the stated context and image size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("orin-nano-8gb", "agx-orin-64gb")


def test_the_full_size_script_runs_tiny(tmp_path):
    env = {**os.environ, "SIZE": "tiny", "THREADS": "1", "PROMPT_TOKENS": "16", "STEPS": "4", "CONTEXT": "2048",
           "IMAGE_SIZE": "1024x1024", "BLOCK_SIZE": "64", "TARGETS": " ".join(TARGETS),
           "PYTHON": sys.executable}  # fmt: skip
    out = tmp_path / "bench"
    res = subprocess.run(["bash", str(ROOT / "scripts" / "bench_qwen_full.sh"), str(out)], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=900)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    sizes = json.loads((out / "sizes.json").read_text())
    for name, form in (("int4", "ort"), ("int4-jp6.1", "qdq")):
        manifest = json.loads((out / name / "manifest.json").read_text())
        assert manifest["architecture"] == "qwen2_5_vl" and manifest["precision"] == "int4"
        assert manifest["quantization"]["decoder"]["form"] == form
        assert manifest["graphs"]["vision"]["quantized"] == "int8-qdq"  # --vision int8 / jp6.1's default
        on_disk = sum(p.stat().st_size for p in (out / name).iterdir() if p.name.startswith("decoder_"))
        assert sizes[name]["decoder_mb"] == round(on_disk / 1e6, 2)
    # tiny language model (tied head counted once): embedding 704 x 64; 2 layers of q/k/v (+ biases), o, gate/up/down
    # and 2 norms; the final norm
    layer = 64 * 64 + 64 + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64
    params = 704 * 64 + 2 * layer + 64
    assert sizes["fp16"]["language_parameters"] == params
    assert sizes["fp16"]["decoder_mb"] == round(params * 2 / 1e6, 2) and "computed" in sizes["fp16"]["how"]
    assert sizes["int4_vs_fp16_decoder"] == round(sizes["int4"]["decoder_mb"] / sizes["fp16"]["decoder_mb"], 4)
    decode = json.loads((out / "decode_int4.json").read_text())
    engines = [r["engine"] for r in decode["results"]]
    assert engines == ["rsedge runtime (onnxruntime)", "PyTorch reference (eager fp32)"]
    assert decode["prompt_tokens"] == 16 and decode["runtime_vs_reference_decode_speedup"] > 0
    for target in TARGETS:
        est = json.loads((out / f"estimate_{target}.json").read_text())
        assert est["target"] == target and est["context"]["value"] == 2048 and est["compute_dtype"] == "fp16"
        assert est["bundle"].endswith("int4-jp6.1")
        assert est["image"]["size"] == [1024, 1024] and est["image"]["tokens"] == 256
        mem = est["memory"]
        verdict = "fits" if mem["fits"] else "DOES NOT FIT"
        line = f"estimate {target} (int4-jp6.1): {mem['total']['value'] / 1e6:,.0f} MB of "
        assert line in res.stdout and verdict in res.stdout.split(line)[1].splitlines()[0]
    assert not (out / "estimate_orin-nx-16gb.json").exists()  # TARGETS chose two
    assert "decode speed-up INT4 runtime vs PyTorch reference" in res.stdout
    int4_mb, fp16_mb = sizes["int4"]["decoder_mb"], sizes["fp16"]["decoder_mb"]
    assert f"decoder: INT4 {int4_mb:.1f} MB vs FP16 {fp16_mb:.1f} MB computed" in res.stdout
