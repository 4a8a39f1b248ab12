#!/usr/bin/env python
"""Train the built-in demo model (RSUniVLM architecture, small dimensions) and write it in the released layout.

Long job for a person to run, not a test:
    .venv/bin/python scripts/train_demo_model.py --out rsedge/data/models/rsunivlm-demo --steps 2000
Seeded and reproducible: the same seed and steps give the same weights on the same machine and torch.
It records data, steps, machine and the final metrics in training_record.json next to the weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rsedge.errors import RsedgeError
from rsedge.training.evaluate import record_metrics
from rsedge.training.train import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-per-task", type=int, default=TrainConfig.eval_per_task)
    ap.add_argument("--time-limit", type=float, default=None, help="seconds; stop training early, recorded")
    ap.add_argument("--init-from", default=None, help="continue from a checkpoint this script wrote")
    ap.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    ap.add_argument("--dense-weight", type=float, default=TrainConfig.dense_weight, help="0 turns it off")
    ap.add_argument("--pointer-weight", type=float, default=TrainConfig.pointer_weight, help="0 turns it off")
    ap.add_argument("--pointer-heads", default="0", help="supervised heads of the pointer layer, e.g. 0,1,2,3")
    ap.add_argument("--pointer-centre", action="store_true", help="point at the centre patch only")
    ap.add_argument("--pointer-force", type=float, default=0.0, help="attention teacher forcing; 0 turns it off")
    ap.add_argument("--force-fraction", type=float, default=TrainConfig.force_fraction)
    ap.add_argument("--freeze-vision", action="store_true", help="keep the vision tower fixed")
    ap.add_argument("--mix", default=None, help='task mix as JSON, e.g. \'{"vg": 0.5, "seg": 0.2, ...}\'')
    args = ap.parse_args()
    cfg = TrainConfig(
        seed=args.seed,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        threads=args.threads,
        eval_per_task=args.eval_per_task,
        time_limit_s=args.time_limit,
        init_from=args.init_from,
        warmup=args.warmup,
        mix=json.loads(args.mix) if args.mix else None,
        dense_weight=args.dense_weight,
        pointer_weight=args.pointer_weight,
        pointer_heads=tuple(int(h) for h in args.pointer_heads.split(",")),
        pointer_centre=args.pointer_centre,
        pointer_force=args.pointer_force,
        force_fraction=args.force_fraction,
        freeze_vision=args.freeze_vision,
    )

    try:
        record = train(cfg, args.out, log=lambda m: print(m, flush=True), evaluate=record_metrics)
    except RsedgeError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(record["metrics"], indent=2))


if __name__ == "__main__":
    main()
