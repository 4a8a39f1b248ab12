"""The whole request against the PyTorch reference: one image, a `[VG]` prompt, 64 new tokens, first and warm.

    python scripts/bench_request.py CHECKPOINT BUNDLE [BUNDLE ...] [--rounds 3] [--threads 2] [--prepare]
        [--json out.json]

Each round runs every engine in a fresh process (so the first request is a real first request: sessions made,
weights prepacked), in an order rotated from round to round, because this project's VMs drift by tens of percent
within minutes and only interleaved rounds compare. The engines:

- each BUNDLE: ``rsedge bench BUNDLE`` (the runtime alone, no torch in the process): the bundle is opened and
  hashed (``open_s``), then the first request and the median of three warm ones; with ``--prepare`` each bundle
  also runs as ``rsedge bench --prepare``: the request's sessions created at open, as a service does at start
  (that time is counted in ``open_s`` and so in "cold", not in the first request);
- the reference: the checkpoint loaded by rsedge's PyTorch reference (eager FP32, the parity reference, on
  ``--threads`` threads), then the same request built the same way (square preprocessing, the same prompt ids,
  expert 1 for `[VG]`), first and the median of two warm ones. Loading is timed apart (``load_s``) as opening is.

Both decode greedily for exactly ``--new-tokens`` tokens (no end-of-sequence stop), so they do the same work.
"cold" is open (or load) + the first request: what a one-shot command costs a fresh process.
Medians over rounds with min-max, the machine's CPU model and flags, and the speed-up of each bundle are printed
as a table and JSON. A person runs this; it is not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "rsedge" / "data" / "samples" / "dior_05863.png"
PROMPT = "[VG] Where is the storage tank?"

REFERENCE = """
import json, statistics, sys, time
from pathlib import Path
import torch
from tokenizers import Tokenizer
from rsedge.models.rsunivlm.modeling import RSUniVLMForCausalLM
from rsedge.runtime.images import load_image
from rsedge.runtime.preprocess import preprocess_square
from rsedge.runtime.prompt import build_prompt, tokenize

ckpt, image_path, prompt, new_tokens, threads = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), int(
    sys.argv[5])
torch.set_num_threads(threads)
t = time.perf_counter()
model = RSUniVLMForCausalLM.from_checkpoint(ckpt).eval()
tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
load_s = time.perf_counter() - t
expert = 1  # [VG]

def request():
    image = load_image(image_path)
    pixels = torch.from_numpy(preprocess_square(image, model.cfg.vision.image_size))
    ids = tokenize(tok, build_prompt(prompt, 1))
    embeds = model.embed_prompt(ids, [model.image_tokens(pixels, image.size)])
    out = model.step(embeds, expert)
    toks = []
    for _ in range(new_tokens):
        nxt = int(torch.argmax(out.logits[0, -1]))
        toks.append(nxt)
        out = model.step(model.lm.model.embed_tokens(torch.tensor([[nxt]])), expert, out.cache)
    return toks, int(embeds.shape[1])

with torch.no_grad():
    t = time.perf_counter(); _, n = request(); first = time.perf_counter() - t
    warm = []
    for _ in range(2):
        t = time.perf_counter(); request(); warm.append(time.perf_counter() - t)
print(json.dumps({"open_s": load_s, "first_request_s": first, "warm_request_s": statistics.median(warm),
                  "prompt_tokens": n}))
"""


def run_bundle(bundle: Path, new_tokens: int, threads: int, prepare: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "rsedge.cli", "bench", str(bundle), "--image", str(IMAGE), "--prompt", PROMPT,
               "--new-tokens", str(new_tokens), "--threads", str(threads), "--json", str(out),
               *(["--prepare"] if prepare else [])]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if res.returncode != 0:
            raise RuntimeError(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "rsedge bench failed")
        r = json.loads(out.read_text())
    got = {k: r[k] for k in ("open_s", "first_request_s", "warm_request_s", "prompt_tokens", "machine")}
    # sessions created at open belong to opening: "open" and "cold" include them
    got["open_s"] += max(r.get("prepare_ms", {}).values(), default=0.0) / 1e3
    return got


def run_reference(checkpoint: Path, new_tokens: int, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, "-c", REFERENCE, str(checkpoint), str(IMAGE), PROMPT, str(new_tokens), str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if res.returncode != 0:
        raise RuntimeError(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else "reference failed")
    return json.loads(res.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds": len(runs)}
    for r in runs:  # what a one-shot command costs: open (or load) the model, then answer once
        r["cold_s"] = r["open_s"] + r["first_request_s"]
    for key in ("open_s", "first_request_s", "warm_request_s", "cold_s"):
        vals = [r[key] for r in runs]
        out[key] = round(statistics.median(vals), 3)
        out[f"{key}_min_max"] = [round(min(vals), 3), round(max(vals), 3)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("bundles", type=Path, nargs="+")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prepare", action="store_true",
                    help="also run each bundle with its request's sessions created at open (rsedge bench --prepare)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    engines: list[tuple[str, Any]] = [("PyTorch reference (eager fp32)", lambda: run_reference(
        args.checkpoint, args.new_tokens, args.threads))]  # fmt: skip
    for b in args.bundles:
        engines.append((f"rsedge {b.name}", lambda b=b: run_bundle(b, args.new_tokens, args.threads)))
        if args.prepare:
            engines.append((f"rsedge {b.name} (sessions at open)",
                            lambda b=b: run_bundle(b, args.new_tokens, args.threads, prepare=True)))  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in engines}
    errors: dict[str, str] = {}
    machine: dict[str, Any] = {}
    for r in range(args.rounds):
        order = engines[r % len(engines) :] + engines[: r % len(engines)]
        line = []
        for name, fn in order:
            if name in errors:
                continue
            t = time.perf_counter()
            try:
                res = fn()
            except RuntimeError as e:  # recorded: the reason is the finding
                errors[name] = str(e)
                line.append(f"{name} failed")
                continue
            machine = res.pop("machine", machine)
            runs[name].append(res)
            line.append(f"{name} first {res['first_request_s']:.2f} s warm {res['warm_request_s']:.2f} s "
                        f"({time.perf_counter() - t:.0f} s)")  # fmt: skip
        print(f"round {r + 1}: " + "; ".join(line), flush=True)

    summary = {name: summarize(rs) for name, rs in runs.items() if rs}
    ref = summary.get(engines[0][0])
    print(f"\n{'engine':40s} {'open/load s':>12s} {'first s':>8s} {'(min-max)':>13s} {'warm s':>8s} "
          f"{'(min-max)':>13s} {'cold s':>7s} {'x first':>8s} {'x warm':>7s} {'x cold':>7s}")  # fmt: skip
    for name, s in summary.items():
        fx, wx, cx = (
            f"{ref[k] / s[k]:.2f}" if ref else "-" for k in ("first_request_s", "warm_request_s", "cold_s")
        )
        (flo, fhi), (wlo, whi) = s["first_request_s_min_max"], s["warm_request_s_min_max"]
        print(f"{name:40s} {s['open_s']:12.2f} {s['first_request_s']:8.2f} {f'({flo:.2f}-{fhi:.2f})':>13s} "
              f"{s['warm_request_s']:8.2f} {f'({wlo:.2f}-{whi:.2f})':>13s} {s['cold_s']:7.2f} {fx:>8s} {wx:>7s} "
              f"{cx:>7s}")  # fmt: skip
    result = {"machine": machine, "prompt": PROMPT, "new_tokens": args.new_tokens, "threads": args.threads,
              "engines": summary, "rounds": runs, "errors": errors}  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
