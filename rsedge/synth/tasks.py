"""RSUniVLM-format task samples from synthetic scenes: prompts, target answers, references and ground truth.

Prompts start with the task tag and carry no ``<image>`` placeholder (the chat template adds those).
Answers use the model's output formats: ``[x1, y1, x2, y2]`` on a 0-100 scale (``format_box``) for
[VG], row-wise run-length text (``format_rle``) on a ``grid`` x ``grid`` partition for [SEG], free text
otherwise. A [SEG] cell takes the queried label when the label covers at least half of it (majority vote).

Splits are seeded streams: sample ``i`` of a split draws from
``SeedSequence(seed, spawn_key=(split_key, stream, i))``, so splits are disjoint, a sample does not
depend on how many others were drawn, and a fixed split is reproducible bit for bit (same numpy and
Pillow).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from rsedge.models.rsunivlm.config import DEFAULT_EXPERT, DEFAULT_ROUTER
from rsedge.runtime.outputs import format_box, format_rle
from rsedge.runtime.router import route
from rsedge.synth.scenes import (
    LABEL_INDEX,
    OBJECT_CLASSES,
    SCENE_CLASSES,
    Scene,
    SceneObject,
    generate_scene,
    make_change_pair,
    mask_grid,
)

TASKS: tuple[str, ...] = ("vg", "ref", "seg", "vqa", "cls", "cap", "ccd", "cseg")
TASK_TAGS: dict[str, str] = {
    "vg": "[VG]",
    "ref": "[REF]",
    "seg": "[SEG]",
    "vqa": "[VQA]",
    "cls": "[CLS]",
    "cap": "[CAP]",
    "ccd": "[CCD]",
    "cseg": "[SEG]",
}
# RSUniVLM's static router (demo app.py): [SEG] -> expert 2, [VG]/[REF] -> 1, everything else -> 0.
ROUTER_TABLE: dict[str, int] = DEFAULT_ROUTER
# Training mix: more weight on the localisation tasks (hardest to learn), fewer on [CLS] (easiest).
DEFAULT_MIX: dict[str, float] = {
    "vg": 0.20,
    "ref": 0.10,
    "seg": 0.15,
    "vqa": 0.15,
    "cls": 0.08,
    "cap": 0.12,
    "ccd": 0.10,
    "cseg": 0.10,
}
SPLIT_KEYS: dict[str, int] = {"train": 0, "val": 1, "test": 2}

CLS_PROMPT = "[CLS] What is the category of this image?"
CAP_PROMPT = "[CAP] Describe this image briefly."
CCD_PROMPT = "[CCD] Please briefly describe the changes in these two images."
# Upstream wording, grammar included: the model was trained on exactly this string.
CSEG_PROMPT = "[SEG] Please segment the building area that have changed in the second image."

SEG_CLASSES: tuple[str, ...] = ("building", "road", "water", "vegetation", "storage tank", "vehicle")
_SEG_WEIGHTS = (0.24, 0.22, 0.2, 0.2, 0.08, 0.06)
# Scene classes likely to hold a class, to find a positive [SEG] example in a try or two.
_SEG_SCENES: dict[str, tuple[str, ...]] = {
    "building": ("residential", "industrial", "harbor", "airport"),
    "road": ("residential", "industrial"),
    "water": ("harbor", "river", "lake"),
    "vegetation": ("forest", "meadow", "farmland", "river", "lake", "airport"),
    "storage tank": ("industrial", "harbor"),
    "vehicle": ("parking",),
}
# Object class -> scene classes where it lives, and how often each class is the subject of VG/REF/VQA.
_OBJECT_SCENES: dict[str, tuple[str, ...]] = {
    "building": ("residential", "industrial", "harbor", "farmland", "river", "lake"),
    "vehicle": ("parking", "residential", "industrial", "farmland", "airport"),
    "ship": ("harbor", "harbor", "river", "lake"),
    "aircraft": ("airport",),
    "storage tank": ("industrial", "harbor"),
}
_OBJECT_WEIGHTS = (0.25, 0.23, 0.18, 0.16, 0.18)  # order of OBJECT_CLASSES
_CHANGE_SCENES = ("residential", "residential", "residential", "industrial", "bareland", "farmland")
_MAX_COUNT = 6  # counting questions only about classes with at most this many instances

_PLURAL = {
    "building": "buildings",
    "vehicle": "vehicles",
    "ship": "ships",
    "aircraft": "aircraft",
    "storage tank": "storage tanks",
    "house": "houses",
    "road": "roads",
}
_NUMBER = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


@dataclass
class TaskSample:
    """One training/evaluation example in RSUniVLM's format (images are H x W x 3 uint8 RGB arrays)."""

    id: str
    task: str
    images: list[np.ndarray]
    prompt: str
    answer: str
    references: list[str]
    meta: dict = field(default_factory=dict)
    # The rendered scene behind each image (synthetic samples only): dense ground truth for training.
    scenes: list[Scene] = field(default_factory=list, repr=False, compare=False)


def task_expert(task: str) -> int:
    """Expert index the default router picks for a task."""
    if task not in TASK_TAGS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return route(TASK_TAGS[task] + " ", ROUTER_TABLE, DEFAULT_EXPERT)


# ---------------------------------------------------------------------------------------------- language


def plural(cls: str, n: int) -> str:
    return cls if n == 1 else _PLURAL.get(cls, cls + "s")


def count_phrase(cls: str, n: int) -> str:
    """'a ship', 'three ships', 'many vehicles', 'no aircraft'."""
    if n == 0:
        return f"no {plural(cls, 0)}"
    if n == 1:
        return f"{article(cls)} {cls}"
    return f"{_NUMBER.get(n, 'many')} {plural(cls, n)}"


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _be(n: int) -> str:
    return "is" if n == 1 else "are"


def _has(n: int) -> str:
    return "has" if n == 1 else "have"


def describe_object(obj: SceneObject) -> str:
    """Short description used as the [REF] answer: 'a large white storage tank'."""
    words = ([obj.size] if obj.size != "medium" else []) + [obj.colour, obj.cls]
    return f"{article(words[0])} {' '.join(words)}"


def box_0_100(box: Sequence[float], width: int, height: int) -> list[float]:
    x1, y1, x2, y2 = box
    return [x1 / width * 100, y1 / height * 100, x2 / width * 100, y2 / height * 100]


# ----------------------------------------------------------------------------------- referring expressions

VG_REGIONS: dict[str, str] = {
    "upper left": "in the upper left",
    "upper right": "in the upper right",
    "lower left": "in the lower left",
    "lower right": "in the lower right",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Margin (fraction of the image side) around region borders: the target must be this far inside its
# region and every other candidate this far outside, so no object sits on an ambiguous border.
REGION_MARGIN = 0.04
# A superlative needs a clear winner: the largest must be this many times larger than the runner-up.
SUPERLATIVE_RATIO = 1.25


@dataclass(frozen=True)
class RefSpec:
    """A referring expression: class plus optional colour, superlative and image region."""

    cls: str
    colour: str | None = None
    superlative: str | None = None  # "largest" | "smallest"
    region: str | None = None  # a key of VG_REGIONS

    def text(self) -> str:
        words = [w for w in (self.superlative, self.colour, self.cls) if w]
        out = "the " + " ".join(words)
        return out + (" " + VG_REGIONS[self.region] if self.region else "")

    def to_dict(self) -> dict:
        return {"cls": self.cls, "colour": self.colour, "superlative": self.superlative, "region": self.region}


def in_region(center: tuple[float, float], size: int, region: str, slack: float) -> bool:
    """Whether a point lies in a named region; slack > 0 widens the region, slack < 0 shrinks it."""
    u, v = center[0] / size, center[1] / size
    lo, hi = 1 / 3 + slack, 2 / 3 - slack
    left, right, top, bottom = u < lo, u > hi, v < lo, v > hi
    mid_u = 1 / 3 - slack < u < 2 / 3 + slack
    mid_v = 1 / 3 - slack < v < 2 / 3 + slack
    return {
        "left": left,
        "right": right,
        "top": top,
        "bottom": bottom,
        "upper left": top and left,
        "upper right": top and right,
        "lower left": bottom and left,
        "lower right": bottom and right,
        "center": mid_u and mid_v,
    }[region]


def resolve_expression(spec: RefSpec, objects: Sequence[SceneObject], size: int) -> list[int]:
    """Indices of every object a reader could take ``spec`` to mean (generous about borders and sizes)."""
    hits = [
        i
        for i, o in enumerate(objects)
        if o.cls == spec.cls
        and (spec.colour is None or o.colour == spec.colour)
        and (spec.region is None or in_region(o.center, size, spec.region, REGION_MARGIN))
    ]
    if spec.superlative == "largest" and hits:
        top = max(objects[i].area for i in hits)
        hits = [i for i in hits if objects[i].area * SUPERLATIVE_RATIO >= top]
    elif spec.superlative == "smallest" and hits:
        low = min(objects[i].area for i in hits)
        hits = [i for i in hits if objects[i].area <= low * SUPERLATIVE_RATIO]
    return hits


def unambiguous_specs(target: int, objects: Sequence[SceneObject], size: int) -> list[RefSpec]:
    """Every expression that picks out exactly ``objects[target]``, simplest first."""
    o = objects[target]
    regions = [r for r in VG_REGIONS if in_region(o.center, size, r, -REGION_MARGIN)]
    candidates = [RefSpec(o.cls), RefSpec(o.cls, o.colour)]
    candidates += [RefSpec(o.cls, superlative=s) for s in ("largest", "smallest")]
    candidates += [RefSpec(o.cls, region=r) for r in regions]
    candidates += [RefSpec(o.cls, o.colour, superlative=s) for s in ("largest", "smallest")]
    candidates += [RefSpec(o.cls, o.colour, region=r) for r in regions]
    # A superlative needs something to beat: "the largest ship" only where there are several ships.
    candidates = [
        c
        for c in candidates
        if c.superlative is None or len(resolve_expression(RefSpec(c.cls, c.colour), objects, size)) >= 2
    ]
    return [c for c in candidates if resolve_expression(c, objects, size) == [target]]


# --------------------------------------------------------------------------------------------- captions


def _dominant_colour(scene: Scene, cls: str) -> str | None:
    colours = [o.colour for o in scene.objects if o.cls == cls]
    if len(colours) < 2:
        return None
    best = max(sorted(set(colours)), key=colours.count)
    return best if colours.count(best) >= 0.6 * len(colours) else None


def caption_pool(scene: Scene) -> list[str]:
    """True statements about a scene in the style of RS caption datasets (several paraphrases)."""
    n = {c: scene.count(c) for c in OBJECT_CLASSES}
    f = scene.layout.facts
    cp = {c: count_phrase(c, n[c]) for c in OBJECT_CLASSES}
    nb, nv, ns, na, nt = n["building"], n["vehicle"], n["ship"], n["aircraft"], n["storage tank"]
    roads = bool(f.get("roads"))
    trees = f.get("trees", 0) > 0
    sc = scene.scene_class
    out: list[str] = []
    if sc == "farmland":
        out += [
            "many pieces of farmland with crops of different colours",
            "a patchwork of rectangular fields",
            "the farmland is divided into neat fields with crop rows",
            "several fields of crops are arranged side by side",
        ]
        if roads:
            out.append("a road passes through the farmland")
        if nb:
            out.append(f"{cp['building']} {_be(nb)} beside the fields")
    elif sc == "forest":
        out += ["a dense forest with many green trees", "the area is covered by dark green trees"]
        out.append("many trees grow closely together in the forest")
        if f.get("clearing"):
            out.append("there is a clearing in the dense forest")
        if roads:
            out.append("a road passes through the forest")
        if nb:
            out.append(f"{cp['building']} {_be(nb)} in a clearing of the forest")
    elif sc == "residential":
        out += [
            f"a residential area with {cp['building']} along the roads",
            f"{cp['building']} {_be(nb)} arranged beside the roads",
            f"{cp['building']} and some roads are in a residential area",
        ]
        if trees:
            out.append(f"some green trees and {cp['building']} are in a residential area")
        colour = _dominant_colour(scene, "building")
        if colour:
            out.append(f"{cp['building']} with {colour} roofs {_be(nb)} near the road")
        if nv:
            out.append(f"{cp['vehicle']} {_be(nv)} on the road in the residential area")
    elif sc == "industrial":
        parts = [cp[c] for c in ("storage tank", "building") if n[c]]
        out.append("an industrial area with " + " and ".join(parts) if parts else "an empty industrial area")
        if nt:
            out.append(f"{cp['storage tank']} {_be(nt)} in an industrial area near a road")
            if nb:
                out.append(f"{cp['storage tank']} {_be(nt)} next to {cp['building']} in a factory area")
        if nb:
            out.append(f"a factory area with {cp['building']} beside the road")
        out.append("a factory area with warehouses and a road")
        if nv:
            out.append(f"{cp['vehicle']} {_be(nv)} on the road of the industrial area")
    elif sc == "harbor":
        side = f.get("water_side", "left")
        out += [f"a harbor with {cp['ship']} near the piers" if ns else "a harbor with piers and no ships"]
        if ns:
            out.append(f"{cp['ship']} {_be(ns)} docked in the harbor")
            out.append(f"{cp['ship']} {_be(ns)} in the water on the {side}")
        out.append("some piers extend into the water of the port")
        if nb:
            out.append(f"a port with {cp['building']} on the shore")
        if nt:
            out.append(f"{cp['storage tank']} {_be(nt)} on the shore of the harbor")
    elif sc == "airport":
        orient = f.get("runway", "horizontal")
        out += [f"an airport with {cp['aircraft']} on the apron", f"a long {orient} runway in the airport"]
        if na:
            out.append(f"{cp['aircraft']} {_be(na)} parked near the runway")
            out.append(f"a runway is next to an apron with {cp['aircraft']}")
            if nb:
                out.append(f"{cp['aircraft']} {_be(na)} parked beside a terminal building")
    elif sc == "river":
        way = "from left to right" if f.get("river") == "horizontal" else "from top to bottom"
        out += [f"a river runs {way} through the land", "a winding river flows through the area"]
        out.append("a meandering river with green banks")
        if roads:
            out.append("a bridge crosses the river")
        if trees:
            out.append("some trees are along the banks of the river")
        if nb:
            out.append(f"{cp['building']} {_be(nb)} near a winding river")
        if ns:
            out.append(f"{cp['ship']} {_be(ns)} on the river")
    elif sc == "lake":
        out += ["a lake surrounded by green meadow", "a pond of blue water is in the middle of the grassland"]
        out.append("a lake with a sandy shore")
        if nb:
            out.append(f"{cp['building']} {_be(nb)} around the lake")
        if ns:
            out.append(f"{cp['ship']} {_be(ns)} on the lake")
        if trees:
            out.append("a lake with some trees around it")
    elif sc == "desert":
        out += ["a desert with many sand dunes", "yellow sand dunes cover the whole area"]
        out += ["the desert is covered by wavy dunes", "rippled dunes in a vast desert"]
        if roads:
            out.append("a road crosses the desert")
        if nb:
            out.append(f"{cp['building']} {_be(nb)} in the desert")
    elif sc == "parking":
        out += [f"a parking lot with {cp['vehicle']}", f"{cp['vehicle']} {_be(nv)} parked neatly in rows"]
        out.append("cars of different colours are parked in a parking lot")
        if nv >= 20:
            out.append("a large parking lot full of cars")
        if nb:
            out.append(f"{cp['building']} {_be(nb)} next to a parking lot")
    elif sc == "bareland":
        out += ["a piece of bare land", "the bare land is brown and almost empty", "a large area of bare soil"]
        if f.get("tracks"):
            out.append("some tracks cross the bare land")
        if nb:
            out.append(f"{cp['building']} {_be(nb)} on the bare land")
        if nv:
            out.append(f"{cp['vehicle']} {_be(nv)} on the bare land")
    elif sc == "meadow":
        out += ["a large green meadow", "the grassland is green and flat", "a piece of green grassland"]
        if trees:
            out.append("some trees are scattered in the meadow")
        if f.get("path"):
            out.append("a path crosses the green meadow")
        if nb:
            out.append(f"{cp['building']} {_be(nb)} in the meadow")
    out = list(dict.fromkeys(out))
    if len(out) < 3:  # a sparse scene: generic sentences keep at least 3 references
        phrase = _SCENE_PHRASES[sc]
        generic = [
            f"an aerial image of {phrase}",
            f"this is {phrase} seen from above",
            f"a remote sensing image of {phrase}",
        ]
        out += generic[: 3 - len(out)]
    return out


_SCENE_PHRASES = {
    "farmland": "farmland",
    "forest": "a forest",
    "residential": "a residential area",
    "industrial": "an industrial area",
    "harbor": "a harbor",
    "airport": "an airport",
    "river": "a river",
    "lake": "a lake",
    "desert": "a desert",
    "parking": "a parking lot",
    "bareland": "bare land",
    "meadow": "a meadow",
}


def _where(region: str) -> list[str]:
    return {
        "upper left": ["in the upper left", "in the top left corner"],
        "upper right": ["in the upper right", "in the top right corner"],
        "lower left": ["in the lower left", "in the bottom left corner"],
        "lower right": ["in the lower right", "in the bottom right corner"],
        "left": ["on the left", "on the left side"],
        "right": ["on the right", "on the right side"],
        "top": ["at the top", "in the upper part"],
        "bottom": ["at the bottom", "in the lower part"],
        "center": ["in the center", "in the middle"],
    }[region]


def change_captions(kind: str, count: int, region: str | None) -> list[str]:
    """LEVIR-CC-style change captions (several paraphrases)."""
    if kind == "none" or not count or region is None:
        return ["there is no change", "the scene remains the same", "no change has occurred", "nothing has changed"]
    a, b = _where(region)
    num = "a" if count == 1 else _NUMBER.get(count, "some")
    bld, house = plural("building", count), plural("house", count)
    if kind == "added":
        return [
            f"{num} {bld} {_be(count)} built {a}",
            f"{num} new {bld} {'appears' if count == 1 else 'appear'} {b}",
            f"{num} {house} {_has(count)} been constructed {a}",
            f"{num} {bld} {_be(count)} added {b}",
        ]
    return [
        f"{num} {bld} {_be(count)} removed {a}",
        f"{num} {bld} {b} {_has(count)} been demolished",
        f"{num} {bld} {'disappears' if count == 1 else 'disappear'} {a}",
        f"{num} {house} {b} {_be(count)} torn down",
    ]


# ------------------------------------------------------------------------------------------------- tasks


def _grid_meta(grid: np.ndarray, label: str, grid_size: int) -> dict:
    return {
        "label": label,
        "labels": ["others", label],
        "grid": grid.astype(np.uint8).tolist(),
        "grid_size": grid_size,
        "threshold": 0.5,
    }


def _scene_for(rng: np.random.Generator, size: int, pool: Sequence[str] | None = None) -> Scene:
    cls = pool[int(rng.integers(len(pool)))] if pool else None
    return generate_scene(rng, size, cls)


def _scene_with(rng: np.random.Generator, size: int, cls: str, tries: int = 12) -> Scene:
    """A scene holding at least one ``cls`` object (mostly from scene classes where it lives)."""
    scene = None
    for _ in range(tries):
        pool = _OBJECT_SCENES[cls] if rng.random() < 0.85 else SCENE_CLASSES
        scene = _scene_for(rng, size, pool)
        if scene.count(cls):
            return scene
    assert scene is not None
    return scene


def _object_class(rng: np.random.Generator) -> str:
    return OBJECT_CLASSES[int(rng.choice(len(OBJECT_CLASSES), p=_OBJECT_WEIGHTS))]


def _vg(rng: np.random.Generator, size: int) -> tuple[Scene, str, str, dict]:
    for _ in range(50):
        # Class first, then a scene holding it: otherwise buildings and cars swamp aircraft and tanks.
        cls = _object_class(rng)
        scene = _scene_with(rng, size, cls)
        idx = [i for i, o in enumerate(scene.objects) if o.cls == cls]
        for t in rng.permutation(idx):
            specs = unambiguous_specs(int(t), scene.objects, size)
            if not specs:
                continue
            # Mostly the simplest expression, otherwise any valid one, so attribute words get practice.
            spec = specs[0] if rng.random() < 0.4 else specs[int(rng.integers(len(specs)))]
            o = scene.objects[int(t)]
            box = box_0_100(o.box, size, size)
            meta = {
                "box": box,
                "box_px": list(o.box),
                "class": o.cls,
                "expression": spec.to_dict(),
                "objects": [x.to_dict() for x in scene.objects],
                "target": int(t),
            }
            return scene, f"[VG] Where is {spec.text()}?", format_box(box), meta
    raise RuntimeError("no scene with a nameable object in 50 tries")


def _ref(rng: np.random.Generator, size: int) -> tuple[Scene, str, str, dict]:
    while True:
        cls = _object_class(rng)
        scene = _scene_with(rng, size, cls)
        cands = [o for o in scene.objects if o.cls == cls]
        if cands:
            break
    o = cands[int(rng.integers(len(cands)))]
    box = box_0_100(o.box, size, size)
    meta = {"box": box, "box_px": list(o.box), "class": o.cls, "colour": o.colour, "size": o.size}
    return scene, f"[REF] what is {format_box(box)}?", describe_object(o), meta


def _seg(rng: np.random.Generator, size: int, grid: int) -> tuple[Scene, str, str, dict]:
    cls = SEG_CLASSES[int(rng.choice(len(SEG_CLASSES), p=_SEG_WEIGHTS))]
    want_positive = rng.random() < 0.9
    cells = np.zeros((grid, grid), bool)
    for _ in range(12):
        pool = _SEG_SCENES[cls] if want_positive and rng.random() < 0.85 else SCENE_CLASSES
        scene = _scene_for(rng, size, pool)
        cells = mask_grid(scene.mask == LABEL_INDEX[cls], grid)
        if bool(cells.any()) == want_positive:
            break
    labels = ["others", cls]
    meta = {"class": cls, **_grid_meta(cells, cls, grid)}
    return scene, f"[SEG] {cls}.", format_rle(cells.astype(np.uint8), labels), meta


def _noun(cls: str) -> str:
    return "water" if cls == "water" else f"{article(cls)} {cls}"


def _present(scene: Scene, cls: str) -> bool | None:
    """Object classes: any instance. Regions: at least 0.5% of the image; None when in between."""
    if cls in OBJECT_CLASSES:
        return scene.count(cls) > 0
    frac = float((scene.mask == LABEL_INDEX[cls]).mean())
    return True if frac >= 0.005 else (False if frac == 0 else None)


def _vqa(rng: np.random.Generator, size: int) -> tuple[Scene, str, str, dict]:
    u = rng.random()
    if u < 0.4:  # counting: mostly 1..6 instances of an object class, sometimes 0
        if rng.random() < 0.85:
            cls = _object_class(rng)
            scene = _scene_with(rng, size, cls)
            for _ in range(6):
                if 1 <= scene.count(cls) <= _MAX_COUNT:
                    break
                scene = _scene_with(rng, size, cls)
        else:
            scene = _scene_for(rng, size)
            cls = _object_class(rng)
        if scene.count(cls) > _MAX_COUNT:  # rare: fall back to a class the scene has few of
            small = [c for c in OBJECT_CLASSES if scene.count(c) <= _MAX_COUNT]
            cls = small[int(rng.integers(len(small)))]
        counts = {c: scene.count(c) for c in OBJECT_CLASSES}
        q = (
            f"How many {plural(cls, 2)} are there?",
            f"How many {plural(cls, 2)} are in the image?",
            f"What is the number of {plural(cls, 2)}?",
        )[int(rng.integers(3))]
        return scene, f"[VQA] {q}", str(counts[cls]), {"kind": "count", "class": cls, "counts": counts}
    if u < 0.75:  # presence, balanced yes/no
        want = rng.random() < 0.5
        cls = (*OBJECT_CLASSES, "road", "water")[int(rng.integers(len(OBJECT_CLASSES) + 2))]
        for _ in range(12):
            wanted = want and cls in OBJECT_CLASSES
            scene = _scene_with(rng, size, cls, tries=1) if wanted else _scene_for(rng, size)
            if _present(scene, cls) is want:
                break
        status = _present(scene, cls)
        if status is None:  # a sliver of road/water: ask about an object class instead
            cls = OBJECT_CLASSES[int(rng.integers(len(OBJECT_CLASSES)))]
            status = _present(scene, cls)
        q = (
            f"Is there {_noun(cls)} in the image?",
            f"Is there {_noun(cls)}?",
            f"Does this picture contain {_noun(cls)}?",
        )[int(rng.integers(3))]
        counts = {c: scene.count(c) for c in OBJECT_CLASSES}
        return scene, f"[VQA] {q}", "yes" if status else "no", {"kind": "presence", "class": cls, "counts": counts}
    # comparison: two classes with different counts, ordered for a balanced yes/no; ties (answer "no") rare
    for _ in range(12):
        scene = _scene_for(rng, size)
        counts = {c: scene.count(c) for c in OBJECT_CLASSES}
        pairs = [(a, b) for a in OBJECT_CLASSES for b in OBJECT_CLASSES if a < b and counts[a] != counts[b]]
        if pairs:
            break
    if pairs and rng.random() < 0.9:
        a, b = pairs[int(rng.integers(len(pairs)))]
        if (counts[a] > counts[b]) != (rng.random() < 0.5):
            a, b = b, a
    else:
        a, b = (OBJECT_CLASSES[int(i)] for i in rng.choice(len(OBJECT_CLASSES), 2, replace=False))
    ans = "yes" if counts[a] > counts[b] else "no"
    q = f"Are there more {plural(a, 2)} than {plural(b, 2)}?"
    return scene, f"[VQA] {q}", ans, {"kind": "compare", "classes": [a, b], "counts": counts}


def make_sample(
    task: str,
    rng: np.random.Generator,
    size: int = 128,
    grid: int = 8,
    sample_id: str | None = None,
) -> TaskSample:
    """One sample of ``task`` (see TASKS) drawn from ``rng``; images are ``size`` x ``size``."""
    if task not in TASK_TAGS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    if sample_id is None:
        sample_id = f"{task}-{int(rng.integers(2**32)):08x}"
    if task in ("ccd", "cseg"):
        scene = _scene_for(rng, size, _CHANGE_SCENES)
        pair = make_change_pair(rng, scene, grid=grid)
        cells = mask_grid(pair.mask, grid)
        refs = change_captions(pair.kind, pair.count, pair.region)
        meta = {
            "scene_class": scene.scene_class,
            "change": pair.kind,
            "count": pair.count,
            "region": pair.region,
            "boxes_px": [list(b) for b in pair.boxes],
            **_grid_meta(cells, "building", grid),
        }
        if task == "ccd":
            ans = refs[int(rng.integers(len(refs)))]
            return TaskSample(sample_id, task, pair.images, CCD_PROMPT, ans, refs, meta, [pair.before, pair.after])
        ans = format_rle(cells.astype(np.uint8), ["others", "building"])
        return TaskSample(sample_id, task, pair.images, CSEG_PROMPT, ans, [ans], meta, [pair.before, pair.after])
    if task == "vg":
        scene, prompt, ans, meta = _vg(rng, size)
    elif task == "ref":
        scene, prompt, ans, meta = _ref(rng, size)
    elif task == "seg":
        scene, prompt, ans, meta = _seg(rng, size, grid)
    elif task == "vqa":
        scene, prompt, ans, meta = _vqa(rng, size)
    elif task == "cls":
        scene = _scene_for(rng, size, SCENE_CLASSES)
        prompt, ans, meta = CLS_PROMPT, scene.scene_class, {"class": scene.scene_class}
    else:  # cap
        scene = _scene_for(rng, size, SCENE_CLASSES)
        pool = caption_pool(scene)
        refs = [pool[int(i)] for i in rng.permutation(len(pool))[:5]]
        meta = {"scene_class": scene.scene_class, "counts": {c: scene.count(c) for c in OBJECT_CLASSES}}
        return TaskSample(sample_id, task, [scene.image], CAP_PROMPT, refs[0], refs, meta, [scene])
    meta.setdefault("scene_class", scene.scene_class)
    return TaskSample(sample_id, task, [scene.image], prompt, ans, [ans], meta, [scene])


# ------------------------------------------------------------------------------------------------ splits


def _normalised_mix(mix: Mapping[str, float] | None) -> dict[str, float]:
    mix = dict(DEFAULT_MIX if mix is None else mix)
    unknown = set(mix) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks in mix: {sorted(unknown)}; known: {', '.join(TASKS)}")
    if any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError("mix weights must be >= 0 and not all zero")
    total = sum(mix.values())
    return {t: mix[t] / total for t in TASKS if mix.get(t, 0) > 0}


def _rng(seed: int, split: str, stream: int, index: int) -> np.random.Generator:
    if split not in SPLIT_KEYS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLIT_KEYS)}")
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(SPLIT_KEYS[split], stream, index)))


def build_split(
    split: Literal["train", "val", "test"],
    n: int,
    seed: int = 0,
    mix: Mapping[str, float] | None = None,
    size: int = 128,
    grid: int = 8,
) -> list[TaskSample]:
    """A fixed split of ``n`` samples with exact task quotas from ``mix`` (largest remainder), shuffled."""
    weights = _normalised_mix(mix)
    raw = {t: w * n for t, w in weights.items()}
    quota = {t: int(v) for t, v in raw.items()}
    for t in sorted(raw, key=lambda t: (quota[t] - raw[t], TASKS.index(t)))[: n - sum(quota.values())]:
        quota[t] += 1
    tasks = [t for t in weights for _ in range(quota[t])]
    order = _rng(seed, split, 2, 0).permutation(len(tasks))
    out = []
    for i, k in enumerate(order):
        task = tasks[int(k)]
        out.append(make_sample(task, _rng(seed, split, 0, i), size, grid, f"{split}-{seed}-{i:06d}-{task}"))
    return out


def iter_samples(
    split: Literal["train", "val", "test"],
    seed: int = 0,
    mix: Mapping[str, float] | None = None,
    size: int = 128,
    grid: int = 8,
    start: int = 0,
) -> Iterator[TaskSample]:
    """An endless stream of samples (task drawn per sample from ``mix``), resumable at ``start``.

    Uses its own seed stream, disjoint from ``build_split`` of any split.
    """
    weights = _normalised_mix(mix)
    names = list(weights)
    cum = np.cumsum([weights[t] for t in names])
    i = start
    while True:
        rng = _rng(seed, split, 1, i)
        task = names[min(int(np.searchsorted(cum, rng.random(), side="right")), len(names) - 1)]
        yield make_sample(task, rng, size, grid, f"{split}-{seed}-s{i:08d}-{task}")
        i += 1


def split_digest(samples: Sequence[TaskSample]) -> str:
    """SHA-256 over ids, prompts, answers, references and image bytes: records a split's exact content."""
    h = hashlib.sha256()
    for s in samples:
        for text in (s.id, s.task, s.prompt, s.answer, *s.references):
            h.update(text.encode())
            h.update(b"\0")
        for im in s.images:
            h.update(str(im.shape).encode())
            h.update(np.ascontiguousarray(im).tobytes())
    return h.hexdigest()
