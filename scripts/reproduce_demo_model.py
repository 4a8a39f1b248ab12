#!/usr/bin/env python
"""Retrain the built-in demo model from scratch, stage by stage, from its own training record.

A person runs it (about 3.8 hours on 2 CPU cores; the record holds each stage's time):
    .venv/bin/python scripts/reproduce_demo_model.py WORK [--record RECORD]
Writes WORK/stage1 .. WORK/stageN (N = 6 for the shipped model), evaluates each like the training script
does, and prints each stage's recorded and reproduced synthetic-test metrics side by side. With
--start-stage K --start-from CKPT it replays stages K..N only, continuing from CKPT (stage K-1's checkpoint).
The last stage's weights are compared bit for bit with the checkpoint beside the record.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from rsedge.demo import BUILTIN_MODEL
from rsedge.errors import RsedgeError
from rsedge.fsutil import refuse_existing
from rsedge.training.evaluate import record_metrics
from rsedge.training.replay import replay_plan, stage_records
from rsedge.training.train import train


def headline(metrics: dict) -> dict[str, float]:
    test = metrics["synthetic_test"]
    return {f"{task} {m}": v for task, scores in test.items() for m, v in scores.items() if m != "n"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path, help="folder for the stages' checkpoints (must not exist)")
    ap.add_argument("--record", type=Path, default=BUILTIN_MODEL / "training_record.json")
    ap.add_argument("--start-stage", type=int, default=1, help="first stage to replay")
    ap.add_argument("--start-from", type=Path, default=None, help="checkpoint of the stage before it")
    args = ap.parse_args()

    try:
        refuse_existing(args.work)
        record = json.loads(args.record.read_text())
        recorded = [headline(s["metrics"]) for s in stage_records(record)]
        plan = replay_plan(record, args.work)
        if not 1 <= args.start_stage <= len(plan) or (args.start_stage > 1) != (args.start_from is not None):
            raise SystemExit(f"error: --start-stage is 1..{len(plan)}; a later one needs --start-from")
        if args.start_from is not None:
            plan[args.start_stage - 1][0].init_from = str(args.start_from)
        for i, (cfg, out) in enumerate(plan, start=1):
            if i < args.start_stage:
                continue
            print(f"stage {i}: {cfg.stop_after or cfg.steps} of {cfg.steps} planned steps -> {out}", flush=True)
            got = headline(train(cfg, out, log=lambda m: print(m, flush=True), evaluate=record_metrics)["metrics"])
            print(f"{'stage ' + str(i) + ' test metric':<28} {'recorded':>9} {'reproduced':>11}")
            for key, value in recorded[i - 1].items():
                print(f"{key:<28} {value:>9.3f} {got.get(key, float('nan')):>11.3f}")
        shipped = args.record.parent / "model.safetensors"
        if shipped.exists():
            a, b = load_file(str(shipped)), load_file(str(out / "model.safetensors"))
            same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            print(f"weights {'identical to' if same else 'DIFFERENT from'} {shipped}")
    except (RsedgeError, OSError, json.JSONDecodeError, KeyError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
