"""Decode speed with the sessions' shared CPU arena against each session's own, interleaved in one process.

    python scripts/bench_arena_decode.py BUNDLE [--expert 0] [--steps 160] [--prompt-tokens 760] [--threads 2]

Two pipelines of the bundle in one process, one with ``SessionConfig.shared_arena`` and one without, each prefill
the same random prompt into one expert and then take decode steps in alternation (the order swapped every step),
so the machine's speed drifting (a shared VM's does by tens of percent within minutes) hits both alike. Prints
each one's prefill times and the median, 10th and 90th percentile of its decode steps.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from rsedge.runtime.bundle import Bundle
from rsedge.runtime.pipeline import Pipeline
from rsedge.runtime.sessions import SessionConfig


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--expert", type=int, default=0)
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--prompt-tokens", type=int, default=760)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    bundle = Bundle.open(args.bundle, verify="size")
    pipes = {
        "shared arena": Pipeline(bundle, SessionConfig(threads=args.threads)),
        "own arenas": Pipeline(bundle, SessionConfig(threads=args.threads, shared_arena=False)),
    }
    ids = np.random.default_rng(0).integers(0, len(next(iter(pipes.values())).embed_tokens), size=args.prompt_tokens)
    prefill: dict[str, list[float]] = {name: [] for name in pipes}
    steps: dict[str, list[float]] = {name: [] for name in pipes}
    for rnd in range(2):  # two requests each, the second with the arenas already grown
        live = {}
        for name in sorted(pipes, reverse=rnd == 1):
            pipe = pipes[name]
            dec = pipe.decoder(args.expert)
            state = dec.new_state(args.prompt_tokens + args.steps + 1)
            t0 = time.perf_counter()
            logits = dec.step(pipe.embed_rows(ids)[None].astype(dec.dtype), state)
            prefill[name].append(time.perf_counter() - t0)
            live[name] = (pipe, dec, state, int(np.argmax(logits)))
        for i in range(args.steps // 2):
            for name in sorted(pipes, reverse=i % 2 == 1):
                pipe, dec, state, tok = live[name]
                t0 = time.perf_counter()
                logits = dec.step(pipe.embed_rows([tok])[None].astype(dec.dtype), state)
                steps[name].append(time.perf_counter() - t0)
                live[name] = (pipe, dec, state, int(np.argmax(logits)))
    for name in pipes:
        d = sorted(steps[name])
        print(
            f"{name:<13} prefill ms {[round(1e3 * p) for p in prefill[name]]}  decode ms median "
            f"{1e3 * statistics.median(d):.2f} p10 {1e3 * d[len(d) // 10]:.2f} p90 {1e3 * d[9 * len(d) // 10]:.2f} "
            f"(n={len(d)})"
        )


if __name__ == "__main__":
    main()
