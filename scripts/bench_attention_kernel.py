#!/usr/bin/env python
"""rsedge's decode-attention kernel against onnxruntime's GroupQueryAttention: one layer's call, at several depths.

A person runs it (not a test): both kernels get the same single-node graph (Qwen2-0.5B's heads by default), bound as
rsedge's runtime binds a decode step (one token, past and present on one shared buffer), and run interleaved, in an
order swapped every round; the table gives each kernel's median microseconds per call over rounds (min-max), and the
figure a whole step pays (x layers). The machine's CPU model and flags are recorded.

    python scripts/bench_attention_kernel.py [--depths 128 760 2000 4000] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from rsedge.bench.bench import machine
from rsedge.kernels import build
from rsedge.kernels.attention_graph import DOMAIN
from rsedge.kernels.single_node import ORT_DOMAIN, Call, Shape, gqa_model, session


def per_call_us(call: Call, reps: int) -> float:
    run, io = call.sess.run_with_iobinding, call.io
    for _ in range(10):
        run(io)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        run(io)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[128, 760, 2000, 4000])
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=24, help="calls per decode step, for the per-step column")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=200, help="calls timed per round")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    shape = Shape(a.heads, a.kv_heads, a.head_size, max(a.depths) + 64)
    lib = build.library()
    kernels = {"onnxruntime": session(gqa_model(ORT_DOMAIN, shape), threads=a.threads),
               "rsedge": session(gqa_model(DOMAIN, shape), lib, threads=a.threads)}
    rows = []
    for depth in a.depths:
        calls = {k: Call(s, shape, 0, depth, 1, depth + 32) for k, s in kernels.items()}
        got: dict[str, list[float]] = {k: [] for k in calls}
        for r in range(a.rounds):
            for k in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                got[k].append(per_call_us(calls[k], a.reps))
        row = {"depth": depth}
        for k, v in got.items():
            row[k] = {"us_median": statistics.median(v), "us_min_max": [min(v), max(v)],
                      "ms_per_step": statistics.median(v) * a.layers / 1e3}
        rows.append(row)
        print(f"depth {depth}: " + ", ".join(f"{k} {row[k]['us_median']:.0f} us" for k in got), flush=True)
    result = {"machine": machine(), "shape": vars(a), "library": str(lib), "rows": rows}
    print(f"{'depth':>6s} {'onnxruntime us':>15s} {'rsedge us':>10s} {'speedup':>8s} {'ms/step (ort -> rsedge)':>26s}")
    for row in rows:
        o, r = row["onnxruntime"], row["rsedge"]
        speedup = o["us_median"] / r["us_median"]
        print(f"{row['depth']:6d} {o['us_median']:15.0f} {r['us_median']:10.0f} {speedup:7.2f}x "
              f"{o['ms_per_step']:12.2f} -> {r['ms_per_step']:.2f}")
    m = result["machine"]
    print(f"machine: {m.get('cpu')} ({', '.join(m.get('cpu_flags', []))}), onnxruntime {m['onnxruntime']}, "
          f"{a.threads} threads")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
