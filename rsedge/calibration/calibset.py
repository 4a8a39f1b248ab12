"""Calibration sets: a balanced, hashed selection of RSUniVLM prompts over real remote-sensing images.

A set is a folder::

    SET/calibration.json    manifest: items, per-expert counts, sources, content_hash
    SET/images/0000.png     the images, RGB PNG, at most MAX_SIDE px on the long side

Each item has its images (paths relative to the set), the prompt with its task tag, the expert the default
router sends it to, the answer in RSUniVLM's format (None for unlabelled prompts) and its source.

Balance: every expert gets an equal share of the items (``size // 3``, the first ``size % 3`` experts one
more), so the [SEG] expert calibrates on long run-length answers and the [VG]/[REF] expert on box answers
rather than both being swamped by captions. Within an expert, tasks take turns (fixed task order); a task
that runs out leaves its turns to the others. Within a task, labelled items come first, and items from
different images come before a second item of the same image. Only when an expert's pool is exhausted do
items repeat (counted in ``repeats``). Items are interleaved across experts, so any prefix stays balanced.

Determinism: choices are ordered by sha256 of (seed, key), not by a library RNG, so a set does not change
under a new numpy or Python. ``content_hash`` is sha256 over the items (ids, prompts, tasks, experts,
answers, sources) with each image given by the sha256 of its decoded RGB pixels and size, so it is stable
across PNG encoders and file names and changes whenever an image or item does.

Runtime module: numpy, Pillow and the stdlib only.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path, PurePosixPath

from PIL import Image

from rsedge.calibration.readers import (
    FORMATS,
    CalibItem,
    CalibrationError,
    Record,
    detect_format,
    parse_source,
    rotation_items,
)
from rsedge.errors import ImageError, OptionError
from rsedge.fsutil import atomic_folder, refuse_existing
from rsedge.runtime.images import load_image
from rsedge.runtime.outputs import format_box
from rsedge.runtime.router import route
from rsedge.synth.real import CATEGORY_WORDS, REAL_DIR, read_manifest, real_samples
from rsedge.synth.tasks import DEFAULT_EXPERT, ROUTER_TABLE, TASK_TAGS, TASKS, article, task_expert

MANIFEST = "calibration.json"
FORMAT = "rsedge-calibration"
FORMAT_VERSION = 1
MAX_SIDE = 512
IMAGES_DIR = "images"
RS_DEFAULT = "rs-default"
EXPERTS: tuple[int, ...] = tuple(sorted({*ROUTER_TABLE.values(), DEFAULT_EXPERT}))
DATA_DIR = Path(str(files("rsedge") / "data"))
_HASH_PREFIX = b"rsedge-calibration/1\n"


@dataclass(frozen=True)
class CalibrationItem:
    """One item of a set; ``images`` are relative to the set's root."""

    id: str
    images: tuple[str, ...]
    prompt: str
    task: str
    expert: int
    answer: str | None
    source: str

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "images": list(self.images),
            "prompt": self.prompt,
            "task": self.task,
            "expert": self.expert,
            "answer": self.answer,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, row: dict) -> CalibrationItem:
        try:
            item = cls(
                id=str(row["id"]),
                images=tuple(str(p) for p in row["images"]),
                prompt=str(row["prompt"]),
                task=str(row["task"]),
                expert=int(row["expert"]),
                answer=None if row["answer"] is None else str(row["answer"]),
                source=str(row["source"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CalibrationError(f"malformed calibration item {str(row)[:80]}: {e!r}") from None
        for rel in item.images:
            p = PurePosixPath(rel)
            if p.is_absolute() or ".." in p.parts:  # a manifest must not reach outside its set
                raise CalibrationError(f"calibration item {item.id} has an image path outside the set: {rel}")
        return item


def prepare_image(path: Path) -> Image.Image:
    """The image as stored in a set: as the runtime loads it (checked, upright, RGB; what it refuses is refused
    here), downscaled (Lanczos) to at most MAX_SIDE on the long side."""
    try:
        img = load_image(path)
    except ImageError as e:
        raise CalibrationError(str(e)) from None
    w, h = img.size
    if max(w, h) > MAX_SIDE:
        f = MAX_SIDE / max(w, h)
        img = img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.LANCZOS)
    return img


def pixel_digest(img: Image.Image) -> str:
    """sha256 of an RGB image's size and pixels: independent of the file format it came from."""
    h = hashlib.sha256(f"{img.width}x{img.height}\0".encode())
    h.update(img.tobytes())
    return h.hexdigest()


def content_hash(items: Sequence[CalibrationItem], digests: dict[str, str]) -> str:
    """sha256 over the items in order, each image given by its pixel digest (``digests``: path -> digest)."""
    h = hashlib.sha256(_HASH_PREFIX)
    for item in items:
        row = item.to_json()
        row["images"] = [digests[p] for p in item.images]
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


@dataclass(frozen=True)
class CalibrationSet:
    """A calibration set: items whose images lie under ``root``, and their content hash.

    Stored sets (``load``, ``build_calibration_set``) have ``root`` = the set's folder; the built-in
    ``rs_default()`` set refers to the package's own images under ``rsedge/data``.
    """

    root: Path
    items: tuple[CalibrationItem, ...]
    content_hash: str
    info: dict = field(default_factory=dict, compare=False)

    @property
    def name(self) -> str:
        return str(self.info.get("name") or self.root)

    def items_for_expert(self, expert: int) -> list[CalibrationItem]:
        """The items the router sends to ``expert`` (empty for an expert the set does not know)."""
        return [item for item in self.items if item.expert == expert]

    def image_paths(self, item: CalibrationItem) -> list[Path]:
        return [self.root / rel for rel in item.images]

    def load_images(self, item: CalibrationItem) -> list[Image.Image]:
        """The item's images, RGB and at most MAX_SIDE px (stored sets already are; rs-default is scaled here)."""
        return [prepare_image(p) for p in self.image_paths(item)]

    def counts(self) -> dict[int, dict[str, int]]:
        """expert -> task -> number of items."""
        out: dict[int, dict[str, int]] = {e: {} for e in EXPERTS}
        for item in self.items:
            tasks = out.setdefault(item.expert, {})
            tasks[item.task] = tasks.get(item.task, 0) + 1
        return out

    def compute_hash(self) -> str:
        """Recompute content_hash from the items and the image files."""
        digests = {rel: pixel_digest(prepare_image(self.root / rel)) for rel in _unique_images(self.items)}
        return content_hash(self.items, digests)

    def verify(self) -> None:
        """Raise CalibrationError when an image is missing or the contents no longer match content_hash."""
        for rel in _unique_images(self.items):
            if not (self.root / rel).is_file():
                raise CalibrationError(f"calibration set {self.name} is incomplete: image {rel} is missing")
        found = self.compute_hash()
        if found != self.content_hash:
            raise CalibrationError(
                f"calibration set {self.name} fails its hash check (recorded {self.content_hash[:16]}, "
                f"contents hash to {found[:16]}): it was modified after it was built; rebuild it"
            )

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> CalibrationSet:
        """Open a set folder and (by default) check every image against the recorded content_hash."""
        path = Path(path)
        manifest = path / MANIFEST
        if not manifest.is_file():
            raise CalibrationError(
                f"{path} is not a calibration set (no {MANIFEST}); build one with `rsedge calibrate build`"
            )
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CalibrationError(f"cannot read {manifest}: {e}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CalibrationError(f"{manifest} is not an rsedge calibration manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise CalibrationError(
                f"{path}: calibration set format version {data.get('format_version')} is not supported "
                f"(this rsedge reads version {FORMAT_VERSION}); rebuild it"
            )
        if not isinstance(data.get("items"), list) or not isinstance(data.get("content_hash"), str):
            raise CalibrationError(f"{manifest} lacks its items or content_hash")
        items = tuple(CalibrationItem.from_json(row) for row in data["items"])
        info = {k: v for k, v in data.items() if k not in ("items", "content_hash")}
        cs = cls(root=path, items=items, content_hash=data["content_hash"], info=info)
        if verify:
            cs.verify()
        return cs

    def save(self, out: str | Path) -> CalibrationSet:
        """Write this set as a set folder at ``out`` (atomically); the copy has the same content_hash."""
        if "architecture" in self.info:  # another architecture's set: items kept as they are (no task tags)
            return _copy_set(self, Path(out))
        chosen = [
            CalibItem([self.root / p for p in item.images], item.prompt, item.answer, item.task, item.source)
            for item in self.items
        ]
        info = {k: v for k, v in self.info.items() if k not in ("format", "format_version")}
        return _write_set(chosen, Path(out), info)


def _unique_images(items: Iterable[CalibrationItem]) -> list[str]:
    return list(dict.fromkeys(rel for item in items for rel in item.images))


# ----------------------------------------------------------------------------------------------- selection


def _order_key(seed: int, salt: str, key: str) -> str:
    return hashlib.sha256(f"{seed}\0{salt}\0{key}".encode()).hexdigest()


def _shuffled(values: Sequence, keys: Sequence[str], seed: int, salt: str) -> list:
    """``values`` in a seeded order that depends only on (seed, salt, key): no library RNG involved."""
    order = sorted(range(len(values)), key=lambda i: (_order_key(seed, salt, keys[i]), i))
    return [values[i] for i in order]


def quotas(size: int) -> dict[int, int]:
    """Items per expert: an equal share, the remainder going one each to the lowest experts."""
    base, extra = divmod(size, len(EXPERTS))
    return {e: base + (1 if k < extra else 0) for k, e in enumerate(EXPERTS)}


def expert_of(prompt: str) -> int:
    """The expert the default (upstream) router sends ``prompt`` to."""
    return route(prompt, ROUTER_TABLE, DEFAULT_EXPERT)


@dataclass
class Stream:
    """The records of one source, in seeded order, with what its format can yield."""

    label: str
    tasks: tuple[str, ...]
    labelled: bool
    records: list[Record]
    read: int = 0


@dataclass
class _Pool:
    """Candidate items of one (expert, task): per record, its labelled and its unlabelled items."""

    labelled: list[list[CalibItem]] = field(default_factory=list)
    unlabelled: list[list[CalibItem]] = field(default_factory=list)

    def sequence(self) -> list[CalibItem]:
        # One item per record in turn (image diversity first), labelled items before unlabelled ones.
        return _round_robin(self.labelled) + _round_robin(self.unlabelled)


def _round_robin(groups: list[list[CalibItem]]) -> list[CalibItem]:
    out = []
    for depth in range(max((len(g) for g in groups), default=0)):
        out.extend(g[depth] for g in groups if depth < len(g))
    return out


def _collect(streams: list[Stream], need: dict[str, int], seed: int) -> dict[tuple[int, str], _Pool]:
    """Expand records, sources in turn, until every task has ``need`` records (labelled ones for labelled
    sources) or its sources run dry; mask-reading records are expanded only as far as needed."""
    pools: dict[tuple[int, str], _Pool] = {}
    labelled_records = dict.fromkeys(TASKS, 0)
    all_records = dict.fromkeys(TASKS, 0)

    def wanted(s: Stream) -> bool:
        if s.read >= len(s.records):
            return False
        have = labelled_records if s.labelled else all_records
        return any(have[t] < need[t] for t in s.tasks)

    while True:
        active = [s for s in streams if wanted(s)]
        if not active:
            return pools
        for s in active:
            if not wanted(s):
                continue
            record = s.records[s.read]
            s.read += 1
            groups: dict[tuple[int, str], list[CalibItem]] = {}
            for item in record.expand():
                groups.setdefault((expert_of(item.prompt), item.task), []).append(item)
            for (expert, task), items in groups.items():
                items = _shuffled(items, [f"{i.source}\0{i.prompt}" for i in items], seed, record.key)
                pool = pools.setdefault((expert, task), _Pool())
                lab = [i for i in items if i.answer is not None]
                unl = [i for i in items if i.answer is None]
                if lab:
                    pool.labelled.append(lab)
                    labelled_records[task] += 1
                if unl:
                    pool.unlabelled.append(unl)
                all_records[task] += 1


def select(streams: list[Stream], size: int, seed: int) -> tuple[list[tuple[CalibItem, int]], int]:
    """(item, expert) pairs of a balanced set of ``size`` items, interleaved across experts, and the number
    of repeated items."""
    if size < len(EXPERTS):
        raise OptionError(f"--size must be at least {len(EXPERTS)} (one item per expert), got {size}")
    share = quotas(size)
    for s in streams:
        s.records = _shuffled(s.records, [r.key for r in s.records], seed, s.label)
        s.read = 0
    pools = _collect(streams, {t: share[task_expert(t)] for t in TASKS}, seed)
    per_expert: dict[int, list[CalibItem]] = {}
    repeats = 0
    for expert in EXPERTS:
        tasks = [t for t in TASKS if (expert, t) in pools]
        if not tasks:
            tags = " ".join(sorted({TASK_TAGS[t] for t in TASKS if task_expert(t) == expert}))
            raise CalibrationError(
                f"no calibration items route to expert {expert} ({tags}); add a source with such data "
                "or a plain image folder"
            )
        sequences = {t: pools[(expert, t)].sequence() for t in tasks}
        picked: list[CalibItem] = []
        cycle = 0
        pos = dict.fromkeys(tasks, 0)
        while len(picked) < share[expert]:
            progressed = False
            for t in tasks:
                if len(picked) < share[expert] and pos[t] < len(sequences[t]):
                    picked.append(sequences[t][pos[t]])
                    pos[t] += 1
                    repeats += int(cycle > 0)
                    progressed = True
            if not progressed:  # every task of this expert is used up: go round again
                cycle += 1
                pos = dict.fromkeys(tasks, 0)
        per_expert[expert] = picked
    out = []
    for k in range(max(share.values())):
        out.extend((per_expert[e][k], e) for e in EXPERTS if k < len(per_expert[e]))
    return out, repeats


# ------------------------------------------------------------------------------------------------ writing


def _summary_info(items: Sequence[CalibrationItem]) -> dict:
    experts: dict[str, dict] = {}
    for e in EXPERTS:
        mine = [i for i in items if i.expert == e]
        tasks: dict[str, int] = {}
        for i in mine:
            tasks[i.task] = tasks.get(i.task, 0) + 1
        experts[str(e)] = {"items": len(mine), "labelled": sum(i.answer is not None for i in mine), "tasks": tasks}
    return {
        "size": len(items),
        "max_side": MAX_SIDE,
        "router": {"table": dict(ROUTER_TABLE), "default": DEFAULT_EXPERT},
        "experts": experts,
    }


def _make_items(chosen: Sequence[CalibItem], rel_of: Callable[[Path], str]) -> list[CalibrationItem]:
    return [
        CalibrationItem(
            id=f"c{k:04d}",
            images=tuple(rel_of(p) for p in item.images),
            prompt=item.prompt,
            task=item.task,
            expert=expert_of(item.prompt),
            answer=item.answer,
            source=item.source,
        )
        for k, item in enumerate(chosen)
    ]


def _write_set(chosen: Sequence[CalibItem], out: Path, info: dict) -> CalibrationSet:
    """Copy the images (RGB PNG, at most MAX_SIDE px, each source file once) and write the manifest."""
    with atomic_folder(out) as tmp:
        (tmp / IMAGES_DIR).mkdir()
        names: dict[Path, str] = {}
        digests: dict[str, str] = {}
        for item in chosen:
            for p in item.images:
                key = p.resolve()
                if key in names:
                    continue
                img = prepare_image(p)
                rel = f"{IMAGES_DIR}/{len(names):04d}.png"
                img.save(tmp / rel, format="PNG")
                names[key] = rel
                digests[rel] = pixel_digest(img)
        items = _make_items(chosen, lambda p: names[p.resolve()])
        digest = content_hash(items, digests)
        info = {**info, **_summary_info(items)}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **info,
            "content_hash": digest,
            "items": [i.to_json() for i in items],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return CalibrationSet(root=out, items=tuple(items), content_hash=digest, info=info)


def _copy_set(calib: CalibrationSet, out: Path) -> CalibrationSet:
    """``calib`` as a set folder: its images as RGB PNG (each once), its items and info unchanged."""
    with atomic_folder(out) as tmp:
        (tmp / IMAGES_DIR).mkdir()
        names: dict[str, str] = {}
        digests: dict[str, str] = {}
        for rel in _unique_images(calib.items):
            img = prepare_image(calib.root / rel)
            names[rel] = f"{IMAGES_DIR}/{len(names):04d}.png"
            img.save(tmp / names[rel], format="PNG")
            digests[names[rel]] = pixel_digest(img)
        items = [
            CalibrationItem(**{**item.__dict__, "images": tuple(names[r] for r in item.images)}) for item in calib.items
        ]
        digest = content_hash(items, digests)
        info = {k: v for k, v in calib.info.items() if k not in ("format", "format_version")}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **info,
            "content_hash": digest,
            "items": [i.to_json() for i in items],
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return CalibrationSet(root=out, items=tuple(items), content_hash=digest, info=info)


def build_calibration_set(sources: Sequence[str | Path], out: str | Path, size: int, seed: int = 0) -> CalibrationSet:
    """Read the datasets at ``sources`` (layouts detected; ``FORMAT=PATH`` forces one), pick a balanced set of
    ``size`` items with ``seed`` and write it to the new folder ``out`` atomically."""
    out = Path(out)
    refuse_existing(out)  # before reading any source (a symlink or a path under a file included)
    if not sources:
        raise OptionError("give at least one calibration source (a dataset folder or a folder of images)")
    streams = []
    described = []
    for src in sources:
        path, name = parse_source(src)
        name = name or detect_format(path)
        fmt = FORMATS[name]
        streams.append(Stream(f"{name}:{path.name}", fmt.tasks, fmt.labelled, fmt.records(path)))
        described.append({"path": str(path), "format": name})
    for s, d in zip(streams, described, strict=True):
        if not s.records:
            raise CalibrationError(
                f"calibration source {d['path']} ({d['format']}) has no usable items (test splits are skipped)"
            )
    chosen, repeats = select(streams, size, seed)
    for s, d in zip(streams, described, strict=True):
        d["records"], d["records_read"] = len(s.records), s.read
    info = {"name": out.name, "seed": seed, "repeats": repeats, "sources": described}
    return _write_set([item for item, _ in chosen], out, info)


# -------------------------------------------------------------------------------------------- rs-default


def _real_manifest() -> list[dict]:
    """The shipped real items with their fixed train/test split (stored in the manifest, never redrawn)."""
    return read_manifest(REAL_DIR)


def _real_test_files() -> tuple[set[Path], set[str]]:
    """Paths and pixel digests of every image of the real test split (masks included)."""
    paths = set()
    for item in _real_manifest():
        if item["split"] == "test":
            paths.update(
                (REAL_DIR / f).resolve() for f in [*item["files"], *([item["mask"]] if "mask" in item else [])]
            )
    return paths, {pixel_digest(prepare_image(p)) for p in paths}


def _real_train_records() -> list[Record]:
    """One record per real train item: its labelled samples, plus a [REF] item for each [VG] box."""
    files = {item["id"]: [REAL_DIR / f for f in item["files"]] for item in _real_manifest()}
    by_item: dict[str, list[CalibItem]] = {}
    for s in real_samples("train"):
        images = files[s.meta["source_id"]]
        items = by_item.setdefault(s.meta["source_id"], [])
        items.append(CalibItem(images, s.prompt, s.answer, s.task, f"rsedge-real:{s.id}"))
        if s.task == "vg":  # the [VG] expert also serves [REF]: ask for the object in the box
            words = CATEGORY_WORDS.get(s.meta["class"], s.meta["class"])
            ref = f"[REF] what is {format_box(s.meta['box'])}?"
            items.append(CalibItem(images, ref, f"{article(words)} {words}", "ref", f"rsedge-real:{s.id}-ref"))
    return [Record(key, functools.partial(list, items)) for key, items in sorted(by_item.items())]


def _shipped_image_records(exclude_paths: set[Path], exclude_digests: set[str]) -> list[Record]:
    """Unlabelled ROTATION prompts on every distinct single image of the real train items and of data/samples."""
    candidates = [
        REAL_DIR / item["files"][0] for item in _real_manifest() if item["split"] == "train" and len(item["files"]) == 1
    ]
    test_ids = {item["id"] for item in _real_manifest() if item["split"] == "test"}
    samples = DATA_DIR / "samples"
    candidates += [
        samples / row["files"][0]
        for row in read_manifest(samples)
        if len(row["files"]) == 1 and row["id"] not in test_ids
    ]
    seen = set(exclude_digests)
    records = []
    for path in sorted(candidates, key=lambda p: p.relative_to(DATA_DIR).as_posix()):
        digest = pixel_digest(prepare_image(path))
        if path.resolve() in exclude_paths or digest in seen:  # test images and duplicates (same pixels)
            continue
        seen.add(digest)
        rel = path.relative_to(DATA_DIR).as_posix()
        records.append(Record(rel, functools.partial(rotation_items, path, len(records), f"rsedge-images:{rel}")))
    return records


@functools.lru_cache(maxsize=8)
def rs_default(size: int = 48, seed: int = 0) -> CalibrationSet:
    """The built-in set: the real RS images shipped in the package (train split only, never the test split),
    labelled items first, unlabelled ROTATION prompts on the same images to fill each expert's share.

    It lives in memory (images are read from ``rsedge/data``); ``rs_default().save(path)`` writes it out as an
    ordinary set folder with the same content_hash.
    """
    test_paths, test_digests = _real_test_files()
    streams = [
        Stream("rsedge-real", TASKS, True, _real_train_records()),
        Stream("rsedge-images", FORMATS["plain"].tasks, False, _shipped_image_records(test_paths, test_digests)),
    ]
    chosen, repeats = select(streams, size, seed)
    for item, _ in chosen:
        for p in item.images:
            if p.resolve() in test_paths:  # guard: the test split must never leak into calibration
                raise CalibrationError(f"rs-default would use the real test image {p}")
    items = _make_items([c for c, _ in chosen], lambda p: p.relative_to(DATA_DIR).as_posix())
    digests = {rel: pixel_digest(prepare_image(DATA_DIR / rel)) for rel in _unique_images(items)}
    info = {
        "name": RS_DEFAULT,
        "seed": seed,
        "repeats": repeats,
        "sources": [
            {"path": "rsedge/data/real (train split)", "format": "rsedge-real"},
            {"path": "rsedge/data/samples", "format": "rsedge-samples"},
        ],
        **_summary_info(items),
    }
    return CalibrationSet(root=DATA_DIR, items=tuple(items), content_hash=content_hash(items, digests), info=info)


def resolve_calibration(name_or_path: str | Path) -> CalibrationSet:
    """ "rs-default" -> the built-in (RSUniVLM) set, "rs-default-unirs" -> UniRS's, "rs-grounding-reasoning" -> the
    grounding-with-reasoning set (rsedge.calibration.reasoning_set); anything else -> the set folder at that path
    (hash-checked)."""
    if str(name_or_path) == RS_DEFAULT:
        return rs_default()
    if str(name_or_path) == "rs-default-unirs":
        from rsedge.calibration.unirs_set import rs_default_unirs  # it builds on this module

        return rs_default_unirs()
    from rsedge.calibration.reasoning_set import RS_GROUNDING_REASONING, rs_grounding_reasoning

    if str(name_or_path) == RS_GROUNDING_REASONING:
        return rs_grounding_reasoning()
    return CalibrationSet.load(name_or_path)


# -------------------------------------------------------------------------------------------------- CLI


def describe(cs: CalibrationSet) -> str:
    """A few lines for a person: items per expert and task, labelled share, sources, hash."""
    labelled = sum(i.answer is not None for i in cs.items)
    lines = [f"calibration set {cs.name}: {len(cs.items)} items ({labelled} labelled), content hash {cs.content_hash}"]
    routes = {e: sorted(t for t, x in ROUTER_TABLE.items() if x == e) for e in EXPERTS}
    for expert, tasks in cs.counts().items():
        tags = " ".join(routes.get(expert, [])) or "default"
        order = {t: k for k, t in enumerate(TASKS)}  # a task of another family's set (vgr) after RSUniVLM's
        mix = ", ".join(
            f"{t} {n}" for t, n in sorted(tasks.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))
        )
        lines.append(f"  expert {expert} ({tags}): {sum(tasks.values())} items: {mix or 'none'}")
    for src in cs.info.get("sources", []):
        read = f", {src['records_read']} of {src['records']} records read" if "records" in src else ""
        lines.append(f"  source {src['path']} ({src['format']}{read})")
    if cs.info.get("repeats"):
        lines.append(f"  {cs.info['repeats']} items repeat: an expert ran out of distinct items; add sources")
    return "\n".join(lines)


def calibrate_build_command(sources: Sequence[str | Path], out: str | Path, size: int, seed: int = 0) -> str:
    """``rsedge calibrate build SOURCE... -o SET --size N --seed S``: build the set, return its summary."""
    return describe(build_calibration_set(list(sources), Path(out), size, seed))
