#!/usr/bin/env python
"""Prefill and decode of an rsedge bundle against onnxruntime-genai and llama.cpp on the same decoder shape.

A person runs it (not a test). The CPU's speed drifts between hours on a shared machine, so the engines
run interleaved, each in its own process, for several rounds, and the medians are compared:
    pip install onnxruntime-genai onnx_ir transformers
    python -m onnxruntime_genai.models.builder -i QWEN2_CKPT -o GENAI_DIR -p int4 -e cpu
    # llama.cpp: convert_hf_to_gguf.py QWEN2_CKPT, llama-quantize ... Q4_0, build llama-bench
    python scripts/bench_engines.py BUNDLE --genai GENAI_DIR --llama-bench BIN --gguf Q4_0.gguf --rounds 5
GENAI_DIR's session is pinned to --threads intra-op threads (written into its genai_config.json); llama-bench
measures the prompt (pp) and the decode at that depth (tg @ d). Prints a table and JSON: prefill seconds
and the median decode step after a prompt of --prompt-tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

GENAI = """
import json, sys, time, numpy as np, onnxruntime_genai as og
d, n, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
m = og.Model(d)
p = og.GeneratorParams(m); p.set_search_options(max_length=n + steps + 8, do_sample=False)
g = og.Generator(m, p)
ids = np.random.default_rng(0).integers(0, 1000, size=n).astype(np.int32)
t = time.perf_counter(); g.append_tokens(ids); pre = time.perf_counter() - t
ts = []
for _ in range(steps):
    t = time.perf_counter(); g.generate_next_token(); ts.append(time.perf_counter() - t)
print(json.dumps({"prefill_s": pre, "decode_ms": 1e3 * float(np.median(ts))}))
"""

RSEDGE = """
import json, sys, numpy as np
from pathlib import Path
from rsedge.bench.decode_floor import bench_runtime
b, n, steps, threads = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
r = bench_runtime(b, 0, np.random.default_rng(0).integers(0, 1000, size=n), steps, threads)
print(json.dumps({"prefill_s": r.prefill_ms / 1e3, "decode_ms": r.decode_step_ms_median}))
"""


def pin_threads(genai_dir: Path, threads: int) -> None:
    path = genai_dir / "genai_config.json"
    cfg = json.loads(path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    path.write_text(json.dumps(cfg, indent=4))


def llama(binary: str, gguf: str, n: int, steps: int, threads: int) -> dict:
    """llama-bench: the prompt, then `steps` tokens decoded at depth n (one repetition each)."""
    args = [binary, "-m", gguf, "-t", str(threads), "-r", "1", "-o", "json"]
    pp = json.loads(subprocess.run([*args, "-p", str(n), "-n", "0"], capture_output=True, text=True, check=True).stdout)
    tg = subprocess.run([*args, "-p", "0", "-n", str(steps), "-d", str(n)], capture_output=True, text=True, check=True)
    return {"prefill_s": n / pp[0]["avg_ts"], "decode_ms": 1e3 / json.loads(tg.stdout)[0]["avg_ts"]}


def one(code: str, *args: str, python: str) -> dict:
    out = subprocess.run([python, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--genai", type=Path, default=None, help="an onnxruntime-genai model folder")
    ap.add_argument("--llama-bench", default=None, help="llama.cpp's llama-bench binary")
    ap.add_argument("--gguf", default=None, help="the GGUF model llama-bench runs")
    ap.add_argument("--prompt-tokens", type=int, default=760)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--genai-python", default=sys.executable, help="interpreter with onnxruntime_genai")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if a.genai:
        pin_threads(a.genai, a.threads)
    runs: dict[str, list[dict]] = {"rsedge": []}
    runs.update({"onnxruntime-genai": []} if a.genai else {})
    runs.update({"llama.cpp": []} if a.llama_bench and a.gguf else {})
    n, s = str(a.prompt_tokens), str(a.steps)
    for i in range(a.rounds):
        if a.genai:
            runs["onnxruntime-genai"].append(one(GENAI, str(a.genai), n, s, python=a.genai_python))
        if "llama.cpp" in runs:
            runs["llama.cpp"].append(llama(a.llama_bench, a.gguf, a.prompt_tokens, a.steps, a.threads))
        runs["rsedge"].append(one(RSEDGE, str(a.bundle), n, s, str(a.threads), python=sys.executable))
        print(f"round {i + 1}: " + ", ".join(f"{k} {v[-1]['decode_ms']:.1f} ms" for k, v in runs.items()), flush=True)
    result = {
        "prompt_tokens": a.prompt_tokens,
        "decode_steps": a.steps,
        "threads": a.threads,
        "rounds": a.rounds,
        "engines": {
            k: {
                "prefill_s_median": statistics.median(r["prefill_s"] for r in v),
                "decode_ms_median": statistics.median(r["decode_ms"] for r in v),
                "decode_ms_rounds": [round(r["decode_ms"], 2) for r in v],
            }
            for k, v in runs.items()
        },
    }
    print(f"{'engine':20s} {'prefill s':>10s} {'decode ms':>10s} {'tok/s':>7s}")
    for k, e in result["engines"].items():
        ms = e["decode_ms_median"]
        print(f"{k:20s} {e['prefill_s_median']:10.2f} {ms:10.2f} {1e3 / ms:7.1f}")
    print(json.dumps(result, indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
