"""Peak memory and time of one decoder prefill at long contexts, each length in a fresh process.

    python scripts/bench_context_memory.py BUNDLE [--tokens 8192 32768] [--expert 0] [--threads 2]
        [--chunk N] [--max-rss-mb 20000] [--ignore-limit] [--json out.json]

Each length runs in a child process that imports only the runtime, loads one expert's decoder through the
runtime's own decoder session, looks up N random token ids in the bundle's embedding table (a synthetic
prompt: what attention costs depends on its length, not its content), runs the prefill of those N tokens
into an empty KV cache, then one decode step, and reports its peak resident set (VmHWM, as
rsedge.bench.peak_memory does), its RSS before loading the bundle, and the seconds each took.

The parent watches the child's RSS and kills it above --max-rss-mb, so a graph whose memory grows with the
square of the prompt cannot take the machine down; such a run is reported as killed, with the RSS it had
reached. A length over the bundle's advertised ``max_positions`` is reported as refused (as the runtime
refuses it) unless --ignore-limit. ``--chunk N`` prefills N tokens per decoder call (the graphs take any
past length), which bounds the attention scores at N x context per head.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.1


def child(bundle: Path, tokens: int, expert: int, threads: int | None, chunk: int | None) -> dict:
    import numpy as np

    from rsedge.bench.peak_memory import _peak_mb, rss_mb
    from rsedge.runtime.pipeline import Pipeline

    floor = rss_mb()
    pipe = Pipeline.load(bundle, threads=threads, verify="size")
    dec = pipe.decoder(expert)
    ids = np.random.default_rng(0).integers(0, len(pipe.embed_tokens), size=tokens)
    embeds = pipe.embed_rows(ids)[None].astype(dec.dtype)
    state = dec.new_state(tokens + 1)
    loaded = _peak_mb()
    t0 = time.perf_counter()
    step = chunk or tokens
    for start in range(0, tokens, step):
        logits = dec.step(embeds[:, start : start + step], state)
    t1 = time.perf_counter()
    tok = int(np.argmax(logits))
    dec.step(pipe.embed_rows([tok])[None].astype(dec.dtype), state)
    t2 = time.perf_counter()
    return {
        "tokens": tokens,
        "chunk": chunk,
        "peak_rss_mb": round(_peak_mb(), 1),
        "rss_before_load_mb": round(floor, 1),
        "peak_after_load_mb": round(loaded, 1),
        "prefill_s": round(t1 - t0, 3),
        "decode_step_s": round(t2 - t1, 4),
    }


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            kib = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
    except (OSError, StopIteration):
        return 0.0
    return kib * 1024 / 1e6


def run_one(args: argparse.Namespace, tokens: int) -> dict:
    cmd = [sys.executable, __file__, str(args.bundle), "--child", "--tokens", str(tokens), "--expert", str(args.expert)]
    cmd += (["--threads", str(args.threads)] if args.threads else []) + (
        ["--chunk", str(args.chunk)] if args.chunk else []
    )
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen, killed = 0.0, False
    while proc.poll() is None:
        seen = max(seen, _rss_mb(proc.pid))
        if seen > args.max_rss_mb:
            proc.kill()
            killed = True
        time.sleep(POLL_S)
    out, err = proc.communicate()
    if killed:
        return {"tokens": tokens, "chunk": args.chunk, "killed_at_rss_mb": round(seen, 1), "cap_mb": args.max_rss_mb}
    if proc.returncode != 0:
        tail = (err.strip().splitlines() or ["?"])[-1]
        return {"tokens": tokens, "chunk": args.chunk, "failed": tail, "rss_seen_mb": round(seen, 1)}
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--expert", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=None, help="prefill this many tokens per decoder call")
    ap.add_argument("--max-rss-mb", type=float, default=20000.0, help="kill a child whose RSS passes this")
    ap.add_argument("--ignore-limit", action="store_true", help="run lengths over the bundle's max_positions")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.bundle, args.tokens[0], args.expert, args.threads, args.chunk)))
        return
    decoder = json.loads((args.bundle / "manifest.json").read_text())["graphs"]["decoder"]
    limit = decoder.get("max_positions")
    rows = []
    for n in args.tokens:
        if limit is not None and n + 1 > limit and not args.ignore_limit:
            row = {"tokens": n, "refused": f"the bundle advertises {limit} positions"}
        else:
            row = run_one(args, n)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        meta = {"bundle": str(args.bundle), "attention": decoder.get("attention"), "max_positions": limit}
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
