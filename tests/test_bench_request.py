"""scripts/bench_request.py, the whole-request comparison a person runs on the full size, on tiny models: both
engines answer the same request in fresh processes, and the table's ratios come from the figures it records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_request_times_both_engines(tiny_checkpoint, tiny_bundle, tmp_path):
    out = tmp_path / "request.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_request.py"), str(tiny_checkpoint), str(tiny_bundle),
           "--rounds", "1", "--new-tokens", "3", "--threads", "1", "--json", str(out)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["errors"] == {} and r["machine"]["cores"] >= 1
    ref, ours = r["engines"]["PyTorch reference (eager fp32)"], r["engines"][f"rsedge {tiny_bundle.name}"]
    for e in (ref, ours):
        assert e["rounds"] == 1 and e["warm_request_s"] > 0 and 0 < e["first_request_s"] < e["cold_s"]
        assert (
            e["cold_s"] == e["open_s"] + e["first_request_s"]
            or abs(e["cold_s"] - e["open_s"] - e["first_request_s"]) < 2e-3
        )
    row = next(line for line in res.stdout.splitlines() if line.startswith(f"rsedge {tiny_bundle.name}"))
    assert row.split()[-3] == f"{ref['first_request_s'] / ours['first_request_s']:.2f}"
    # the same prompt: both saw as many prompt tokens
    rounds = r["rounds"]
    assert (
        rounds["PyTorch reference (eager fp32)"][0]["prompt_tokens"]
        == rounds[f"rsedge {tiny_bundle.name}"][0]["prompt_tokens"]
    )
