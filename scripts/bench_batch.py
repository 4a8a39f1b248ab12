"""Measure rsedge batch: one archive answered by a local pool of 1 and of 2 workers and by 2 Ray actors; the
answers must be identical (to each other and to Pipeline.generate's); prints items/s with the machine.

    python scripts/bench_batch.py [--bundle BUNDLE] [--items 200] [--rounds 3] [--json OUT]

Each round runs the three in a rotated order (a machine shared with other work drifts; the load average before
each run is recorded); the figures are medians over rounds with min-max. Ray is started once, before the first
round (its start-up is reported apart), and stays up throughout.

Without --bundle it exports the tiny test model (needs the export extra). The archive is crops of the shipped
sample images (seeded, 64 to 512 pixels a side), so every item is a different image.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from rsedge.batch.answer import Job, PipelineSpec
from rsedge.batch.items import collect_items
from rsedge.batch.journal import job_header
from rsedge.batch.local import LocalPool, plan_pool, usable_cpus
from rsedge.batch.on_ray import RayPool, import_ray
from rsedge.batch.runner import run_batch
from rsedge.bench.bench import machine
from rsedge.demo import SAMPLES
from rsedge.runtime.bundle import Bundle
from rsedge.runtime.pipeline import Pipeline

JOB = Job("[VG] Where is the storage tank?", max_new_tokens=32)
SOURCES = ["aid_storagetanks_207.jpg", "dior_05863.png", "dota_P0075.png", "levircc_test_000289_A.png"]


def make_crops(folder: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    images = [Image.open(SAMPLES / s).convert("RGB") for s in SOURCES]
    folder.mkdir(parents=True)
    for i in range(n):
        im = images[i % len(images)]
        side = rng.randint(64, min(im.size))
        x, y = rng.randint(0, im.width - side), rng.randint(0, im.height - side)
        im.crop((x, y, x + side, y + side)).save(folder / f"crop{i:04d}.png")
    return folder


def tiny_bundle(work: Path) -> Path:
    from rsedge.export.bundle import export_bundle
    from rsedge.models.rsunivlm.checkpoint import make_checkpoint

    ckpt = make_checkpoint(work / "ckpt", size="tiny", seed=0)
    export_bundle(ckpt, work / "bundle", precision="fp32")
    return work / "bundle"


def answers(out: Path) -> dict[str, list[int]]:
    lines = [json.loads(x) for x in out.read_text().splitlines()[1:]]
    return {r["id"]: r["answer"]["token_ids"] for r in lines}


def run_one(name: str, work: Path, n: int, header: dict, items: list, spec: PipelineSpec) -> dict:
    out = work / f"{name.replace(' ', '').replace(',', '-')}-{n}.jsonl"
    load = os.getloadavg()[0]
    if name.startswith("local"):
        workers = 1 if "1" in name else 2
        pool = LocalPool(spec, JOB, plan_pool(workers, None, usable_cpus(), 0, None))
    else:
        pool = RayPool(spec, JOB, "auto", workers=2)
    res = run_batch(out, header, items, pool).to_json()
    return res | {"threads": pool.plan.threads, "load_avg_1m_before": load, "out": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    bundle = args.bundle or tiny_bundle(work)
    archive = make_crops(work / "archive", args.items)
    items, _ = collect_items(archive, JOB.prompt, None)
    header = job_header(bundle, Bundle.open(bundle).manifest_bytes, JOB)
    spec = PipelineSpec(str(bundle))
    ray = import_ray()
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=usable_cpus(), include_dashboard=False, logging_level="WARNING")
    ray_init_s = time.perf_counter() - t0
    names = ["local, 1 worker", "local, 2 workers", "Ray, 2 actors"]
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names[r % 3 :] + names[: r % 3]:
            runs[name].append(run_one(name, work, r, header, items, spec))
            print(name, runs[name][-1], file=sys.stderr)
    ray.shutdown()
    pipe = Pipeline.load(bundle)
    ref = {
        it.id: pipe.generate([str(p) for p in it.paths()], JOB.prompt, max_new_tokens=JOB.max_new_tokens).tokens
        for it in items
    }
    identical = {name: all(answers(Path(r["out"])) == ref for r in rs) for name, rs in runs.items()}
    figures = {name: _figures(rs) for name, rs in runs.items()}
    result = {
        "machine": machine() | {"load_avg_1m_at_end": os.getloadavg()[0]},
        "items": len(items),
        "job": JOB.__dict__,
        "ray_init_s": round(ray_init_s, 2),
        "figures": figures,
        "identical_to_generate": identical,
        "runs": runs,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    if not all(identical.values()):
        sys.exit(1)


def _figures(rs: list[dict]) -> dict:
    def spread(key: str) -> str:
        vals = [r[key] for r in rs if r[key] is not None]
        return f"{statistics.median(vals):.1f} ({min(vals):.1f}-{max(vals):.1f})"

    return {"items_per_s": spread("items_per_s"), "steady_items_per_s": spread("steady_items_per_s")}


if __name__ == "__main__":
    main()
