"""What a batch answers: the items of a folder or a list file, single images, before/after pairs, or scenes
(rasters rsedge.geo reads: georeferenced, more bits or bands than Pillow takes; answered tiled, rsedge.batch.scenes).

An item's id is its place in the archive (a path relative to the folder or as written in the list; for a pair,
the part its two names share), so a resumed run recognises the items already answered whatever order the files
are listed in.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rsedge.batch import DEFAULT_PAIR_RULE
from rsedge.errors import OptionError
from rsedge.runtime.prompt import IMAGE_PLACEHOLDER
from rsedge.runtime.router import IMAGE_COUNTS, task_tag

# Files a folder walk takes: what Pillow reads for load_image, and rasters GDAL reads as scenes.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".jp2"})
# Suffixes of files that may be scenes: only these are opened to decide (a PNG archive is not read twice).
SCENE_SUFFIXES = frozenset({".tif", ".tiff", ".jp2"})


@dataclass(frozen=True)
class Item:
    """One unit of work: ``kind`` names how it is answered (rsedge.batch.answer.ITEM_KINDS); ``names`` are its
    files in order (before, after for a pair) as the archive names them, found under ``root``; ``problem`` is set
    for an item that cannot be answered (half a pair), which the batch records as an error line instead of
    running."""

    id: str
    kind: str
    names: tuple[str, ...]
    problem: str | None = None
    root: str = ""

    def paths(self) -> list[Path]:
        """The files to open (absolute where the archive's root is: a Ray actor on another node opens them)."""
        return [Path(self.root) / n for n in self.names]


@dataclass(frozen=True)
class PairRule:
    """How the two images of a pair are named: two patterns over a path relative to the archive, each with one
    ``{id}`` (the part both share) and ``*`` for any run of characters within one name, e.g. ``{id}_A.*`` and
    ``{id}_B.*``, or ``A/{id}.*`` and ``B/{id}.*`` for LEVIR-CD's before/ and after/ folders."""

    before: str
    after: str

    @classmethod
    def parse(cls, text: str) -> PairRule:
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 2 or not all(parts):
            raise OptionError(f"--pairs takes BEFORE,AFTER patterns such as {DEFAULT_PAIR_RULE!r}, got {text!r}")
        for p in parts:
            if p.count("{id}") != 1:
                raise OptionError(f"--pairs pattern {p!r} must hold {{id}} exactly once")
        if parts[0] == parts[1]:
            raise OptionError(f"--pairs patterns must differ, got {parts[0]!r} twice")
        return cls(parts[0], parts[1])

    def key(self, rel: str, which: str) -> str | None:
        """The shared id of ``rel`` under the ``before`` or ``after`` pattern, else None."""
        m = _compile(self.before if which == "before" else self.after).fullmatch(rel)
        return m.group("id") if m else None


def _compile(pattern: str) -> re.Pattern[str]:
    out = []
    for piece in re.split(r"(\{id\}|\*)", pattern):
        if piece == "{id}":
            out.append(r"(?P<id>.+?)")
        elif piece == "*":
            out.append(r"[^/]*")
        else:
            out.append(re.escape(piece))
    return re.compile("".join(out))


def scan_folder(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursively, hidden ones skipped), as sorted posix paths relative to it."""
    found = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            found.append(rel.as_posix())
    return sorted(found)


def read_list(list_file: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """A list file: one image path a line, or a before and an after path separated by a tab (an explicit pair);
    blank lines and lines starting with # are skipped. Returns (single paths, explicit pairs) as written."""
    singles: list[str] = []
    pairs: list[tuple[str, str]] = []
    try:
        text = list_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise OptionError(f"{list_file}: not a text list of image paths") from None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split("\t")
        if len(fields) == 1:
            singles.append(fields[0])
        elif len(fields) == 2:
            pairs.append((fields[0].strip(), fields[1].strip()))
        else:
            raise OptionError(f"{list_file}:{n}: a line holds one path, or two separated by a tab")
    return singles, pairs


def make_items(
    files: Iterable[str], image_counts: tuple[int, ...], rule: PairRule | None, pairs: Iterable[tuple[str, str]] = ()
) -> tuple[list[Item], int]:
    """Items for a task taking ``image_counts`` images (``router.IMAGE_COUNTS``): pairs by ``rule`` where the task
    takes two, single images where it takes one. Returns (items, files left out), the latter being files a
    two-image-only task cannot use alone.

    Half a pair (a before with no after, or the reverse) is an item with a problem when the task needs pairs, so it
    shows in the output rather than vanishing.
    """
    files = list(files)
    items: list[Item] = []
    paired: set[str] = set()
    if 2 in image_counts:
        items += [Item(f"{a},{b}", "pair", (a, b)) for a, b in pairs]
        if rule is not None:
            befores = {k: f for f in files if (k := rule.key(f, "before")) is not None}
            afters = {k: f for f in files if (k := rule.key(f, "after")) is not None}
            for key in sorted(befores.keys() | afters.keys()):
                a, b = befores.get(key), afters.get(key)
                if a is not None and b is not None:
                    items.append(Item(key, "pair", (a, b)))
                    paired |= {a, b}
                elif 1 not in image_counts:  # the task needs pairs: the missing half is worth a line
                    have = a or b
                    missing = "after" if b is None else "before"
                    items.append(Item(key, "pair", (have,), f"{have}: no {missing} image matches --pairs"))
                    paired.add(have)
    elif pairs:
        raise OptionError("the list holds before/after pairs, but the prompt's task takes one image")
    left_out = 0
    for f in files:
        if f in paired:
            continue
        if 1 in image_counts:
            items.append(Item(f, "image", (f,)))
        else:
            left_out += 1
    dup = [i for i, n in Counter(it.id for it in items).items() if n > 1]
    if dup:  # a resume tells items apart by id: two with one id would pass for each other
        raise OptionError(f"two items share the id {dup[0]!r}; make the --pairs patterns tell them apart")
    return items, left_out


def image_counts(prompt: str) -> tuple[int, ...]:
    """Images a request with ``prompt`` takes (the router's rule; a prompt placing <image> itself takes as many)."""
    placed = prompt.count(IMAGE_PLACEHOLDER)
    if placed:
        return (placed,)
    return IMAGE_COUNTS.get(task_tag(prompt) or "", (1,))


def collect_items(inputs: Path, prompt: str, rule: PairRule | None) -> tuple[list[Item], int]:
    """The items of a folder (walked recursively) or a list file, for ``prompt``'s task. Returns (items, files
    left out because the task takes only pairs)."""
    counts = image_counts(prompt)
    if len(counts) == 1 and counts[0] > 2:
        raise OptionError(f"rsedge batch answers items of one image or a pair; the prompt places {counts[0]} images")
    if inputs.is_dir():
        root, files, pairs = inputs.resolve(), scan_folder(inputs), []
    elif inputs.is_file():
        root = inputs.resolve().parent  # a list's relative paths are relative to the list
        files, pairs = read_list(inputs)
    else:
        raise OptionError(f"--inputs {inputs}: no such folder or list file")
    items, left_out = make_items(files, counts, rule, pairs)
    if not items:
        raise OptionError(f"--inputs {inputs}: no items to answer ({_what_needed(counts)})")
    return [Item(it.id, _kind(it, root), it.names, it.problem, str(root)) for it in items], left_out


def _kind(item: Item, root: Path) -> str:
    """A single image becomes a scene where rsedge.geo would read it as one (as ``rsedge run`` does); a file GDAL
    cannot open stays an image, for Pillow to say what is wrong with it."""
    if item.kind != "image" or Path(item.names[0]).suffix.lower() not in SCENE_SUFFIXES:
        return item.kind
    from rsedge.geo.scene import wants_scene

    return "scene" if wants_scene(root / item.names[0]) else "image"


def _what_needed(counts: tuple[int, ...]) -> str:
    if counts == (2,):
        return "the task takes before/after pairs and none matched --pairs"
    return f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))})"
