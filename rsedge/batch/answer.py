"""One item through a loaded Pipeline: the record the batch writes for it, an answer or an error.

How an item is answered depends on its kind, looked up in :data:`ITEM_KINDS`. Images and pairs are one
``Pipeline.generate`` call; a scene (rsedge.batch.scenes: bands, stretch, tiling, boxes merged in map coordinates)
is one ``rsedge.geo.tiling.answer_scene`` call.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from rsedge.batch.items import Item
from rsedge.batch.scenes import SceneSettings, answer_scene_item
from rsedge.errors import RsedgeError
from rsedge.runtime.pipeline import Pipeline
from rsedge.runtime.sampling import Sampling


@dataclass(frozen=True)
class Job:
    """What every item is asked, and with which settings: the part of a batch that decides its answers (a resume
    must ask the same, see rsedge.batch.journal)."""

    prompt: str
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    expert: int | None = None
    scene: SceneSettings | None = None  # set when the archive holds scenes

    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, seed=self.seed)

    def to_header(self) -> dict[str, Any]:
        """The settings that decide the answers, for the output's header: a scene's GeoJSON file is an output
        beside them, so a resume may add or drop ``--geojson-dir``."""
        out = asdict(self)
        if out["scene"] is not None:
            del out["scene"]["geojson"]
        return out


@dataclass(frozen=True)
class PipelineSpec:
    """How a worker loads its Pipeline: everything is plain data, so it travels to a process or a Ray actor."""

    bundle: str
    device: str = "cpu"
    threads: int | None = None
    verify: str = "sha256"
    trust: tuple[str, ...] = ()

    def load(self) -> Pipeline:
        return Pipeline.load(
            self.bundle, device=self.device, threads=self.threads, verify=self.verify, trust=list(self.trust) or None
        )


def answer_images(pipe: Pipeline, item: Item, job: Job) -> dict[str, Any]:
    """An image or a before/after pair: one generate call; its answer as ``rsedge run --json`` prints it."""
    ans = pipe.generate(
        [str(p) for p in item.paths()],
        job.prompt,
        max_new_tokens=job.max_new_tokens,
        sampling=job.sampling(),
        expert=job.expert,
    )
    return ans.to_json()


# Item kind -> how a loaded Pipeline answers it (returns the record's "answer").
ITEM_KINDS: dict[str, Callable[[Pipeline, Item, Job], dict[str, Any]]] = {
    "image": answer_images,
    "pair": answer_images,
    "scene": answer_scene_item,
}


def answer_item(pipe: Pipeline, item: Item, job: Job) -> dict[str, Any]:
    """The item's output line: ``ok`` with its answer, or ``ok: false`` with the error that item met. A file rsedge
    refuses gives its one-line ImageError; anything else an item raises (a decoder Pillow crashes in) is recorded
    with its type too, because one odd file must not stop an archive of thousands. A dead worker still stops the
    batch (rsedge.batch.local, rsedge.batch.on_ray)."""
    record: dict[str, Any] = {"id": item.id, "kind": item.kind, "files": list(item.names)}
    t0 = time.perf_counter()
    if item.problem is not None:
        record.update(ok=False, error=item.problem, error_type="ImageError")
    else:
        try:
            record.update(ok=True, answer=ITEM_KINDS[item.kind](pipe, item, job))
        except RsedgeError as e:
            record.update(ok=False, error=str(e), error_type=type(e).__name__)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            record.update(ok=False, error=f"{item.id}: {type(e).__name__}: {first}", error_type=type(e).__name__)
    record["item_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
    record["worker"] = f"{socket.gethostname()}:{os.getpid()}"
    return record
