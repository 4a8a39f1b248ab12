"""Archives for the rsedge batch tests: copies of the shipped sample images in sub-folders, a corrupt file, and
what Pipeline.generate answers for each item (the reference a batch must reproduce)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rsedge.batch.answer import Job
from rsedge.batch.items import Item
from rsedge.demo import SAMPLES
from rsedge.runtime.pipeline import Pipeline

SAMPLE_FILES = sorted(p.name for p in SAMPLES.iterdir() if p.suffix in (".png", ".jpg"))
CORRUPT = "broken/corrupt.png"


def make_archive(folder: Path, copies: int, corrupt: bool = True) -> Path:
    """``copies`` sub-folders holding every sample image (8 files, two _A/_B pairs among them), and a corrupt PNG."""
    for n in range(copies):
        sub = folder / f"copy{n:03d}"
        sub.mkdir(parents=True)
        for name in SAMPLE_FILES:
            shutil.copyfile(SAMPLES / name, sub / name)
    if corrupt:
        (folder / CORRUPT).parent.mkdir(parents=True, exist_ok=True)
        (folder / CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    return folder


def comparable(answer: dict[str, Any]) -> dict[str, Any]:
    """What must be identical between two runs of one item (timings differ by nature)."""
    return {k: answer.get(k) for k in ("text", "token_ids", "tag", "expert", "boxes", "mask", "image_sizes")}


def reference(bundle: Path, items: list[Item], job: Job) -> dict[str, dict[str, Any]]:
    """Each item answered by one Pipeline.generate call in this process: id -> comparable answer (or the error
    type for an item generate refuses)."""
    pipe = Pipeline.load(bundle)
    out: dict[str, dict[str, Any]] = {}
    for it in items:
        try:
            ans = pipe.generate([str(p) for p in it.paths()], job.prompt, max_new_tokens=job.max_new_tokens)
        except Exception as e:
            out[it.id] = {"error_type": type(e).__name__}
        else:
            out[it.id] = comparable(ans.to_json())
    return out


def read_output(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(header, records) of a batch output; every line must be complete JSON."""
    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    lines = [json.loads(line) for line in raw.splitlines()]
    return lines[0], lines[1:]


def answers_of(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """id -> comparable answer, or the error type of an error record."""
    return {r["id"]: comparable(r["answer"]) if r["ok"] else {"error_type": r["error_type"]} for r in records}
