#!/usr/bin/env python
"""Prefill and decode of an rsedge bundle against onnxruntime-genai and llama.cpp, same weights, same machine.

A person runs it (not a test). Each peer is built at its best and from the very weights the bundle carries:

    python scripts/peer_checkpoint.py CKPT QWEN2 --expert 0          # the bundle's expert as a Qwen2 folder
    rsedge export CKPT -o BUNDLE --target cpu --precision int4       # block 128, int8 activations
    # onnxruntime-genai (pip install onnxruntime-genai onnx_ir transformers torch): block 128, logits of the
    # last token only, int8 activations. `int4_block_size` is not an option of 0.18's builder: it is ignored
    # without a word and gives block 32.
    python -m onnxruntime_genai.models.builder -i QWEN2 -o GENAI -p int4 -e cpu \
        --extra_options block_size=128 prune_lm_head=true accuracy_level=4
    # llama.cpp: a native Release build (the source ships in PyPI's llama-cpp-python sdist, vendor/llama.cpp)
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON
    cmake --build build --target llama-bench llama-quantize
    python scripts/peer_gguf.py LLAMA_CPP_DIR QWEN2 --outtype f16 --outfile f16.gguf  # convert_hf_to_gguf.py
    build/bin/llama-quantize --pure f16.gguf q4_0.gguf Q4_0
    python scripts/bench_engines.py BUNDLE --genai GENAI --llama-bench build/bin/llama-bench --gguf q4_0.gguf

Huge pages: rsedge collapses its sessions' weights into transparent huge pages itself (rsedge.runtime.hugepages);
the peers do not ask for them. `--thp-variants` adds rows that show what that is worth on each side: rsedge with
it turned off (RSEDGE_HUGE_PAGES=0), onnxruntime-genai with glibc allocating in huge pages
(GLIBC_TUNABLES=glibc.malloc.hugetlb=1, set before the process starts) and llama.cpp reading its weights into
such memory instead of mapping the file (the same tunable and `-lm none`).

The machine's speed drifts by the hour, so engines run interleaved, each in its own process, for several
rounds, in an order rotated every round; the table gives each engine's median over rounds and the min-max.
Every engine is measured the same way: the prefill of a --prompt-tokens prompt, and the median of single
decode steps at that depth (llama-bench: --llama-reps repetitions of one token after that depth). The
machine's CPU model and SIMD flags are recorded, and an engine that cannot run is named with its reason.
"""

from __future__ import annotations

import argparse
import json
import os
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
print(json.dumps({"prefill_s": pre, "decode_ms": 1e3 * float(np.median(ts)), "decode_ms_mean": 1e3 * np.mean(ts)}))
"""

RSEDGE = """
import json, sys, numpy as np
from pathlib import Path
from rsedge.bench.decode_floor import bench_runtime
b, n, steps, threads = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
r = bench_runtime(b, 0, np.random.default_rng(0).integers(0, 1000, size=n), steps, threads)
out = {"prefill_s": r.prefill_ms / 1e3, "decode_ms": r.decode_step_ms_median, "decode_ms_mean": r.decode_step_ms_mean,
       "attention": r.attention}
print(json.dumps(out))
"""


def pin_threads(genai_dir: Path, threads: int) -> None:
    path = genai_dir / "genai_config.json"
    cfg = json.loads(path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    path.write_text(json.dumps(cfg, indent=4))


GLIBC_THP = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}  # glibc >= 2.35: malloc advises huge pages


def llama(binary: str, gguf: str, n: int, reps: int, threads: int, env: dict | None = None) -> dict:
    """llama-bench: the prompt (pp n), then single decode steps after a depth of n (tg 1 @ d n, reps times);
    with ``env`` (huge pages), the weights are read into allocated memory (-lm none) that glibc advises."""
    args = [binary, "-m", gguf, "-t", str(threads), "-o", "json"] + (["-lm", "none"] if env else [])
    run_env = {**os.environ, **(env or {})}
    pp = subprocess.run(
        [*args, "-r", "1", "-p", str(n), "-n", "0"], capture_output=True, text=True, check=True, env=run_env
    )
    tg = subprocess.run(
        [*args, "-r", str(reps), "-p", "0", "-n", "1", "-d", str(n)],
        capture_output=True,
        text=True,
        check=True,
        env=run_env,
    )
    steps_ms = [ns / 1e6 for ns in json.loads(tg.stdout)[0]["samples_ns"]]
    return {
        "prefill_s": n / json.loads(pp.stdout)[0]["avg_ts"],
        "decode_ms": statistics.median(steps_ms),
        "decode_ms_mean": statistics.fmean(steps_ms),
    }


def one(code: str, *args: str, python: str, env: dict | None = None) -> dict:
    run_env = {**os.environ, **(env or {})}
    out = subprocess.run([python, "-c", code, *args], capture_output=True, text=True, check=True, env=run_env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(rounds: list[dict]) -> dict:
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return {"error": rounds[-1]["error"] if rounds else "not run"}
    dec, pre = [r["decode_ms"] for r in ok], [r["prefill_s"] for r in ok]
    return {
        "rounds": len(ok),
        "prefill_s_median": statistics.median(pre),
        "prefill_s_min_max": [min(pre), max(pre)],
        "decode_ms_median": statistics.median(dec),
        "decode_ms_min_max": [min(dec), max(dec)],
        "decode_ms_rounds": [round(x, 2) for x in dec],
        "errors": [r["error"] for r in rounds if "error" in r],
        **({"attention": ok[-1]["attention"]} if "attention" in ok[-1] else {}),  # rsedge's decode attention kernel
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path, nargs="+", help="rsedge bundle(s) (e.g. with and without --kv-cache int8)")
    ap.add_argument("--genai", type=Path, action="append", default=[], help="onnxruntime-genai model folder(s)")
    ap.add_argument("--llama-bench", default=None, help="llama.cpp's llama-bench binary")
    ap.add_argument("--gguf", default=None, help="the GGUF model llama-bench runs")
    ap.add_argument("--prompt-tokens", type=int, default=760)
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed (rsedge, onnxruntime-genai)")
    ap.add_argument("--llama-reps", type=int, default=16, help="single decode steps timed by llama-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--genai-python", default=sys.executable, help="interpreter with onnxruntime_genai")
    ap.add_argument("--thp-variants", action="store_true", help="also run each engine with huge pages switched")
    ap.add_argument("--kernel-variants", action="store_true",
                    help="also run the first bundle with rsedge's attention kernel off (RSEDGE_KERNELS=0)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    from rsedge.bench.bench import machine

    n, s = str(a.prompt_tokens), str(a.steps)
    engines: dict = {}
    for bundle in a.bundle:
        name = "rsedge" if len(a.bundle) == 1 else f"rsedge ({bundle.name})"
        engines[name] = lambda b=bundle: one(RSEDGE, str(b), n, s, str(a.threads), python=sys.executable)
    if a.thp_variants:
        off = {"RSEDGE_HUGE_PAGES": "0"}
        engines[f"rsedge ({a.bundle[0].name}) THP off"] = lambda: one(
            RSEDGE, str(a.bundle[0]), n, s, str(a.threads), python=sys.executable, env=off
        )
    if a.kernel_variants:
        engines[f"rsedge ({a.bundle[0].name}) kernels off"] = lambda: one(
            RSEDGE, str(a.bundle[0]), n, s, str(a.threads), python=sys.executable, env={"RSEDGE_KERNELS": "0"}
        )
    skipped: dict[str, str] = {}
    for folder in a.genai:
        pin_threads(folder, a.threads)
        name = "onnxruntime-genai" if len(a.genai) == 1 else f"onnxruntime-genai ({folder.name})"
        engines[name] = lambda folder=folder: one(GENAI, str(folder), n, s, python=a.genai_python)
        if a.thp_variants:
            engines[f"{name} +THP"] = lambda folder=folder: one(
                GENAI, str(folder), n, s, python=a.genai_python, env=GLIBC_THP
            )
    if not a.genai:
        skipped["onnxruntime-genai"] = "no --genai model folder given"
    if a.llama_bench and a.gguf:
        engines["llama.cpp"] = lambda: llama(a.llama_bench, a.gguf, a.prompt_tokens, a.llama_reps, a.threads)
        if a.thp_variants:
            engines["llama.cpp +THP"] = lambda: llama(
                a.llama_bench, a.gguf, a.prompt_tokens, a.llama_reps, a.threads, env=GLIBC_THP
            )
    else:
        skipped["llama.cpp"] = "no --llama-bench binary and --gguf model given"
    runs: dict[str, list[dict]] = {k: [] for k in engines}
    order = list(engines)
    for i in range(a.rounds):
        for name in order[i % len(order) :] + order[: i % len(order)]:
            try:
                runs[name].append(engines[name]())
            except (subprocess.CalledProcessError, OSError, ValueError, KeyError) as e:
                detail = getattr(e, "stderr", None) or str(e)
                runs[name].append({"error": f"{type(e).__name__}: {str(detail).strip()[-400:]}"})
        line = ", ".join(f"{k} {v[-1].get('decode_ms', float('nan')):.1f} ms" for k, v in runs.items())
        print(f"round {i + 1}: {line}", flush=True)
    result = {
        "machine": machine(),
        "prompt_tokens": a.prompt_tokens,
        "decode_steps": a.steps,
        "llama_reps": a.llama_reps,
        "threads": a.threads,
        "rounds": a.rounds,
        "engines": {k: summary(v) for k, v in runs.items()},
        "not_run": skipped,
    }
    print(f"{'engine':28s} {'prefill s':>10s} {'(min-max)':>13s} {'decode ms':>10s} {'(min-max)':>13s} {'tok/s':>7s}")
    for k, e in result["engines"].items():
        if "error" in e:
            print(f"{k:28s} could not run: {e['error']}")
            continue
        ms, (lo, hi), (plo, phi) = e["decode_ms_median"], e["decode_ms_min_max"], e["prefill_s_min_max"]
        print(
            f"{k:20s} {e['prefill_s_median']:10.2f} {f'({plo:.2f}-{phi:.2f})':>13s} {ms:10.2f} "
            f"{f'({lo:.1f}-{hi:.1f})':>13s} {1e3 / ms:7.1f}"
        )
    for k, why in skipped.items():
        print(f"{k:28s} not run: {why}")
    print(json.dumps(result, indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
