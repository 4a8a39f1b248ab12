"""UniRS's built-in calibration set: its four tasks (captions, VQA, change captions with pairs, video scenes) on
the real train images shipped in ``rsedge/data/real``, as untagged questions that UniRS's vicuna_v1 template
wraps when the export feeds them (``rsedge.models.unirs.calibration``).

The same :class:`CalibrationSet` as RSUniVLM's sets, hashed the same way (items and the images' pixel
digests), so the manifest records its name, content hash and item count like any other. Its ``info`` says
whom it is for (``architecture`` "unirs", ``template`` "vicuna_v1"): the export driver refuses, in one line, a
set made for another architecture's prompts (an RSUniVLM set's task tags and ChatML) and the other way round.

Balance: each task gets an equal share of ``size`` (the first ``size % 4`` tasks one more), labelled items
first, items taking turns across tasks so any prefix stays balanced; a task that runs out leaves its turns to
the others (no repeats). Order within a task is by sha256 of (seed, task, id), as RSUniVLM's sets are chosen.
A ``video`` item lists the one scene its clip pans over (``rsedge.synth.unirs_real.pan_frames``, the model's
``num_video_frames`` frames).

Runtime module: numpy, Pillow and the stdlib only.
"""

from __future__ import annotations

import functools
import hashlib

from rsedge.calibration.calibset import (
    DATA_DIR,
    CalibrationItem,
    CalibrationSet,
    content_hash,
    pixel_digest,
    prepare_image,
)
from rsedge.calibration.readers import CalibrationError
from rsedge.synth.unirs_real import TASKS, UniRSItem, unirs_items

RS_DEFAULT_UNIRS = "rs-default-unirs"
ARCHITECTURE = "unirs"
TEMPLATE = "vicuna_v1"


def _quotas(size: int) -> dict[str, int]:
    base, extra = divmod(size, len(TASKS))
    return {t: base + (1 if k < extra else 0) for k, t in enumerate(TASKS)}


def seeded_order(items: list[UniRSItem], seed: int, salt: str) -> list[UniRSItem]:
    """``items`` ordered by sha256 of (seed, salt, id): stable under any numpy or Python, as RSUniVLM's sets."""
    return sorted(items, key=lambda i: hashlib.sha256(f"{seed}\0{salt}\0{i.id}".encode()).hexdigest())


def select(items: list[UniRSItem], size: int, seed: int) -> list[UniRSItem]:
    """A balanced, deterministic choice of at most ``size`` items, interleaved across tasks."""
    pools: dict[str, list[UniRSItem]] = {}
    for t in TASKS:
        mine = seeded_order([i for i in items if i.task == t], seed, t)
        pools[t] = [i for i in mine if i.answer is not None] + [i for i in mine if i.answer is None]
    share, pos = _quotas(size), dict.fromkeys(TASKS, 0)
    picked: list[UniRSItem] = []
    while len(picked) < size:
        open_tasks = [t for t in TASKS if pos[t] < len(pools[t])]
        if not open_tasks:
            break  # every pool is used up: a smaller set rather than repeats
        # A task under its share goes first; once all are at their share, the others fill the freed turns.
        under = [t for t in open_tasks if pos[t] < share[t]] or open_tasks
        for t in under:
            if len(picked) < size:
                picked.append(pools[t][pos[t]])
                pos[t] += 1
    return picked


@functools.lru_cache(maxsize=4)
def rs_default_unirs(size: int = 32, seed: int = 0) -> CalibrationSet:
    """The built-in UniRS set: ``size`` items of the real train split (never the test split, which parity
    evaluates on), in memory, images read from ``rsedge/data``; ``.save(path)`` writes it as a set folder."""
    chosen = select(unirs_items("train"), size, seed)
    if not chosen:
        raise CalibrationError("the shipped real train split has no UniRS items")
    items = [
        CalibrationItem(
            id=f"u{k:04d}",
            images=tuple(p.relative_to(DATA_DIR).as_posix() for p in item.files),
            prompt=item.prompt,
            task=item.task,
            expert=0,  # one dense decoder
            answer=item.answer,
            source=f"{item.source}:{item.id}",
        )
        for k, item in enumerate(chosen)
    ]
    digests = {
        rel: pixel_digest(prepare_image(DATA_DIR / rel)) for rel in dict.fromkeys(r for i in items for r in i.images)
    }
    tasks = {t: sum(i.task == t for i in items) for t in TASKS}
    info = {
        "name": RS_DEFAULT_UNIRS,
        "architecture": ARCHITECTURE,
        "template": TEMPLATE,
        "seed": seed,
        "size": len(items),
        "labelled": sum(i.answer is not None for i in items),
        "tasks": tasks,
        "video": "one scene per item; its frames pan across it (rsedge.synth.unirs_real.pan_frames)",
        "sources": [{"path": "rsedge/data/real (train split)", "format": "rsedge-real"}],
    }
    return CalibrationSet(root=DATA_DIR, items=tuple(items), content_hash=content_hash(items, digests), info=info)
