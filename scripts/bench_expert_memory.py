"""Resident memory a fresh runtime-only process adds per decoder expert, loading all three in turn.

    python scripts/bench_expert_memory.py BUNDLE [--image rsedge/data/samples/dior_05863.png] [--threads 2]
        [--max-new-tokens 24] [--json out.json]

A child process imports only the runtime, loads the bundle (``verify="size"``, as rsedge.bench.peak_memory), and
answers a ``[VG]``, a ``[SEG]`` and a ``[CAP]`` request about one image, one after another: the router sends each
to another expert, so each request creates one more expert's decoder session (and its INT8 prefill twin where
the bundle has one). After each answer it reports the resident set (VmRSS, split into anonymous and file-backed
pages, which onnxruntime's memory-mapped external data and the embedding table are), and the peak (VmHWM).
The difference between consecutive requests is what that expert's session added; the first request also holds
the vision graph. ``--own-arenas`` gives each onnxruntime session its own CPU memory arena, as the runtime did
before the sessions of a process shared one (``SessionConfig.shared_arena``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = ("[VG] Where is the storage tank?", "[SEG] storage tank.", "[CAP] Describe this image briefly.")
FIELDS = {"VmRSS": "rss_mb", "RssAnon": "anon_mb", "RssFile": "file_mb", "VmHWM": "peak_rss_mb"}


def memory() -> dict[str, float]:
    """This process's resident set, its anonymous and file-backed parts, and its peak (MB, from /proc)."""
    out: dict[str, float] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in FIELDS:
                out[FIELDS[key]] = round(int(line.split()[1]) * 1024 / 1e6, 1)
    return out


def child(bundle: Path, image: Path, threads: int | None, max_new_tokens: int, own_arenas: bool) -> dict:
    # imported here so the floor includes the runtime's imports
    from rsedge.runtime.bundle import Bundle
    from rsedge.runtime.pipeline import Pipeline
    from rsedge.runtime.sessions import SessionConfig

    rows = [{"step": "start", **memory()}]
    pipe = Pipeline(Bundle.open(bundle, verify="size"), SessionConfig(threads=threads, shared_arena=not own_arenas))
    rows.append({"step": "bundle loaded", **memory()})
    for prompt in PROMPTS:
        t0 = time.perf_counter()
        ans = pipe.generate([image], prompt, max_new_tokens=max_new_tokens)
        rows.append(
            {
                "step": prompt.split()[0],
                "expert": ans.expert,
                "seconds": round(time.perf_counter() - t0, 2),
                "decode_ms_per_token": round(ans.timings.get("decode_per_token", 0.0), 1),
                "token_ids": [int(t) for t in ans.tokens],
                **memory(),
            }
        )
    return {"bundle": str(bundle), "threads": threads, "own_arenas": own_arenas, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--image", type=Path, default=Path(__file__).parent.parent / "rsedge/data/samples/dior_05863.png")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--own-arenas", action="store_true", help="each session its own CPU arena (before the shared one)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.bundle, args.image, args.threads, args.max_new_tokens, args.own_arenas)))
        return
    # A fresh process: this one has imported argparse only, but a caller's may hold anything.
    cmd = [sys.executable, __file__, "--child", str(args.bundle), "--image", str(args.image)]
    cmd += ["--max-new-tokens", str(args.max_new_tokens)] + (["--threads", str(args.threads)] if args.threads else [])
    cmd += ["--own-arenas"] if args.own_arenas else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"child failed:\n{out.stderr.strip()}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    prev = None
    print(f"{'step':<14} {'expert':>6} {'RSS MB':>8} {'added':>7} {'anon':>7} {'file':>7} {'peak':>7} {'s':>6}")
    for row in result["rows"]:
        added = "" if prev is None else f"{row['rss_mb'] - prev:+.1f}"
        print(
            f"{row['step']:<14} {row.get('expert', ''):>6} {row['rss_mb']:>8.1f} {added:>7} {row['anon_mb']:>7.1f} "
            f"{row['file_mb']:>7.1f} {row['peak_rss_mb']:>7.1f} {row.get('seconds', ''):>6}"
        )
        prev = row["rss_mb"]
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
