#!/usr/bin/env python
"""How a checkpoint's [VG] boxes miss: IoU, overlap, centre and size errors on synthetic test samples.

A person runs it (about 25 s for 400 samples on 2 CPU cores):
    .venv/bin/python scripts/grounding_errors.py rsedge/data/models/rsunivlm-demo --n 400
Greedy answers through the PyTorch reference on N samples of a [VG]-only synthetic test split (other
scenes than the training record's 100, which come from an all-task split); boxes parsed as the Acc@0.5
metric parses them. Prints a table, or JSON with --json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from rsedge.metrics.grounding import box_iou, first_box
from rsedge.models.rsunivlm.modeling import RSUniVLMForCausalLM
from rsedge.synth.tasks import build_split
from rsedge.training.evaluate import answer, stop_ids


def box_errors(checkpoint: Path, n: int, seed: int = 0) -> dict[str, float]:
    model = RSUniVLMForCausalLM.from_checkpoint(checkpoint)
    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    eos = stop_ids(model, tok)
    ious, centre, size = [], [], []
    for s in build_split("test", n, seed=seed, mix={"vg": 1.0}):
        box, target = first_box(answer(model, tok, s, model.cfg.vision.image_size, eos)), s.meta["box"]
        if box is None:
            ious.append(0.0)
            continue
        ious.append(box_iou(box, target))
        (x1, y1, x2, y2), (t1, u1, t2, u2) = box, target
        centre.append(np.hypot((x1 + x2 - t1 - t2) / 2, (y1 + y2 - u1 - u2) / 2))
        size.append([abs((x2 - x1) - (t2 - t1)), abs((y2 - y1) - (u2 - u1))])
    iou = np.array(ious)
    c25, c50, c75 = np.percentile(centre, [25, 50, 75]) if centre else (np.nan,) * 3
    w_err, h_err = np.mean(size, axis=0) if size else (np.nan, np.nan)
    return {
        "n": n,
        "acc@0.5": float((iou >= 0.5).mean()),
        "mean_iou": float(iou.mean()),
        "overlap": float((iou > 0).mean()),
        "no_box": float(n - len(centre)) / n,
        "centre_err_p25": float(c25),
        "centre_err_median": float(c50),
        "centre_err_p75": float(c75),
        "width_err_mean": float(w_err),
        "height_err_mean": float(h_err),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--n", type=int, default=400, help="test [VG] samples")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.n < 1:
        raise SystemExit("error: --n must be at least 1")
    torch.set_num_threads(args.threads)
    figures = box_errors(args.checkpoint, args.n)
    if args.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"{'figure':<20} {'value':>8}   (points on the 0-100 scale)")
    for key, value in figures.items():
        print(f"{key:<20} {value:>8.3f}")


if __name__ == "__main__":
    main()
