"""Seeded procedural aerial scenes with exact ground truth, fast enough to stream training data on a CPU.

A scene is drawn top-down in two layers:

- the *base*: a class-specific ground texture (fields, canopy, dunes, concrete...) plus static regions
  (roads, water, runways, lots, trees), drawn once;
- the *objects*: buildings, vehicles, ships, aircraft and storage tanks, kept as drawing primitives so
  the same place can be re-rendered with objects added or removed (change pairs, `make_change_pair`).

Each render applies its own lighting (gain, tint, haze) and sensor noise, so a change pair differs in
illumination as well as in content, as real bi-temporal pairs do.

Determinism: every random draw comes from the caller's ``np.random.Generator``; the noise banks are
built from fixed seeds. Per-pixel maths is limited to +, * and table look-ups (trigonometry goes
through ``math`` on short 1-D inputs) so results do not depend on SIMD code paths. Ground truth is read
back from the rendered label mask, so boxes match the pixels exactly whatever Pillow's rasteriser does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

LABELS: tuple[str, ...] = (
    "others",
    "building",
    "road",
    "water",
    "vegetation",
    "vehicle",
    "ship",
    "aircraft",
    "storage tank",
)
LABEL_INDEX = {name: i for i, name in enumerate(LABELS)}
OTHERS, BUILDING, ROAD, WATER, VEGETATION, VEHICLE, SHIP, AIRCRAFT, TANK = range(len(LABELS))

OBJECT_CLASSES: tuple[str, ...] = ("building", "vehicle", "ship", "aircraft", "storage tank")
REGION_CLASSES: tuple[str, ...] = ("building", "road", "water", "vegetation")
SCENE_CLASSES: tuple[str, ...] = (
    "farmland",
    "forest",
    "residential",
    "industrial",
    "harbor",
    "airport",
    "river",
    "lake",
    "desert",
    "parking",
    "bareland",
    "meadow",
)

# Named colours an object can carry; distinct enough to survive the lighting jitter.
COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (226, 226, 220),
    "gray": (136, 137, 134),
    "dark": (46, 46, 52),
    "red": (176, 50, 42),
    "blue": (50, 86, 168),
    "yellow": (212, 182, 56),
}
_COLOUR_WEIGHTS: dict[str, dict[str, float]] = {
    "building": {"white": 0.25, "gray": 0.3, "red": 0.2, "blue": 0.15, "dark": 0.1},
    "vehicle": {"white": 0.3, "gray": 0.15, "dark": 0.2, "red": 0.15, "blue": 0.12, "yellow": 0.08},
    "ship": {"white": 0.45, "gray": 0.2, "dark": 0.1, "red": 0.15, "blue": 0.1},
    "aircraft": {"white": 0.75, "gray": 0.25},
    "storage tank": {"white": 0.6, "gray": 0.3, "dark": 0.1},
}
# Long-side thresholds (px at 128) for the size words: <= small_max is "small", >= large_min "large".
_SIZE_WORDS: dict[str, tuple[int, int]] = {
    "building": (13, 21),
    "vehicle": (0, 13),  # cars are plain "vehicle"s, trucks are "large"
    "ship": (18, 27),
    "aircraft": (20, 28),
    "storage tank": (12, 20),
}
SHADOW = (34, 37, 40)
ASPHALT = (88, 89, 94)
CONCRETE = (160, 158, 150)
SOIL = (150, 122, 92)
SAND = (204, 176, 128)
WATER_RGB = (38, 72, 98)
GRASS = (98, 128, 66)
TREE = (46, 84, 44)

Box = tuple[int, int, int, int]
# A drawing primitive: (shape, coordinates, RGB fill, mask label or None to leave the label as is).
Prim = tuple[str, list, tuple[int, int, int], int | None]


@dataclass(frozen=True)
class SceneObject:
    """One object seen from above: class, pixel box (x1, y1, x2, y2; x2/y2 exclusive), colour and size words."""

    cls: str
    box: Box
    colour: str
    size: str  # "small" | "medium" | "large"

    @property
    def area(self) -> int:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2

    def to_dict(self) -> dict:
        return {"cls": self.cls, "box": list(self.box), "colour": self.colour, "size": self.size}


@dataclass
class _Item:
    """An object (or a ground patch) as primitives; ``box`` is the geometric box used for placement."""

    kind: str
    prims: list[Prim]
    box: Box
    colour: str = ""
    size: str = "medium"


@dataclass
class Layout:
    """Everything needed to re-render a scene: base layer, items, and facts used by captions."""

    scene_class: str
    size: int
    base: np.ndarray  # H x W x 3 uint8
    base_mask: np.ndarray  # H x W uint8
    items: list[_Item]
    occupied: np.ndarray  # H x W bool: footprint of items plus padding
    sun: tuple[int, int]
    facts: dict


@dataclass
class Scene:
    """A rendered aerial scene with its ground truth."""

    image: np.ndarray  # H x W x 3 uint8
    mask: np.ndarray  # H x W uint8, indices into `labels`
    labels: tuple[str, ...]
    scene_class: str
    objects: list[SceneObject]
    size: int
    layout: Layout = field(repr=False)
    visible: frozenset[int] = field(default=frozenset(), repr=False)  # item ids drawn in this render

    def count(self, cls: str) -> int:
        return sum(o.cls == cls for o in self.objects)

    def class_mask(self, name: str) -> np.ndarray:
        """Boolean H x W mask of one label."""
        return self.mask == LABEL_INDEX[name]


@dataclass
class ChangePair:
    """Two renders of one place; ``mask`` marks building pixels that appeared or disappeared."""

    before: Scene
    after: Scene
    mask: np.ndarray  # H x W bool
    kind: str  # "added" | "removed" | "none"
    count: int
    region: str | None  # 3x3 region name of the changed buildings (see REGION_NAMES)
    boxes: list[Box]

    @property
    def images(self) -> list[np.ndarray]:
        return [self.before.image, self.after.image]


# ---------------------------------------------------------------------------------------------- noise banks

_BANKS: dict[tuple[str, int], np.ndarray] = {}


def _upsampled(rng: np.random.Generator, side: int, cell: int) -> np.ndarray:
    """Smooth unit-variance noise of ``side`` px with features about ``cell`` px across."""
    n = side // cell + 3
    coarse = rng.standard_normal((n, n)).astype(np.float32)
    big = Image.fromarray(coarse).resize((n * cell, n * cell), Image.BICUBIC)
    out = np.asarray(big, dtype=np.float32)[cell : cell + side, cell : cell + side]
    # float64 reductions: their result must not depend on the SIMD summation order.
    mean, std = float(out.mean(dtype=np.float64)), float(out.std(dtype=np.float64))
    return ((out - np.float32(mean)) / np.float32(std + 1e-6)).astype(np.float32)


def _bank(kind: str, size: int) -> np.ndarray:
    """Noise bank twice the image side, cached per (kind, size); fixed seeds keep it reproducible."""
    key = (kind, size)
    if key not in _BANKS:
        side = 2 * size
        rng = np.random.default_rng([0x5EED, size, ("fine", "crown", "medium", "coarse").index(kind)])
        if kind == "fine":
            _BANKS[key] = rng.standard_normal((side, side, 3)).astype(np.float32)
        else:
            cell = {"crown": 4, "medium": 16, "coarse": 44}[kind]
            _BANKS[key] = _upsampled(rng, side, max(2, round(cell * size / 128)))
    return _BANKS[key]


def _crop(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    bank = _bank(kind, size)
    y, x = rng.integers(0, size, 2)
    out = bank[y : y + size, x : x + size]
    return out[::-1] if rng.random() < 0.5 else out


# ------------------------------------------------------------------------------------------------- builder


def _jitter(rng: np.random.Generator, rgb: Sequence[int], amount: float = 0.08) -> tuple[int, int, int]:
    r = rng.random(4)  # one call: per-call overhead dominates at this size
    f = 1.0 + amount * (2 * r[0] - 1)
    return tuple(int(min(255, max(0, round(c * f + 8 * r[i + 1] - 4)))) for i, c in enumerate(rgb))  # type: ignore[return-value]


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    u = rng.random() * sum(weights.values())
    for name, w in weights.items():
        u -= w
        if u < 0:
            return name
    return name


def _size_word(cls: str, long_side: int, size: int) -> str:
    small_max, large_min = _SIZE_WORDS[cls]
    s = size / 128
    if long_side <= small_max * s:
        return "small"
    if long_side >= large_min * s:
        return "large"
    return "medium"


def _rect(x1: int, y1: int, x2: int, y2: int) -> list[tuple[int, int]]:
    """Polygon of the pixels x1..x2-1, y1..y2-1 (exclusive box)."""
    return [(x1, y1), (x2 - 1, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)]


def _rotate(points: list[tuple[int, int]], w: int, h: int, quarter: int) -> list[tuple[int, int]]:
    """Rotate local points inside a w x h box by quarter turns (integer-exact)."""
    out = points
    for _ in range(quarter % 4):
        out = [(h - 1 - y, x) for x, y in out]
        w, h = h, w
    return out


class _Builder:
    """Draws the base layer eagerly and collects object primitives; all sizes scale with size/128."""

    def __init__(self, rng: np.random.Generator, size: int, scene_class: str) -> None:
        self.rng = rng
        self.size = size
        self.s = size / 128
        self.scene_class = scene_class
        self.items: list[_Item] = []
        self.occupied = np.zeros((size, size), dtype=bool)
        self.facts: dict = {}
        k = max(1, self.S(2))
        self.sun = (int(rng.choice([-1, 1])) * k, int(rng.choice([-1, 1])) * k)
        self._img: Image.Image | None = None
        self._msk: Image.Image | None = None
        self._mask_np: np.ndarray | None = None

    def S(self, v: float) -> int:  # scale a length given at 128 px
        return max(1, round(v * self.s))

    # --- base layer
    def set_ground(self, rgb: np.ndarray, labels: np.ndarray | int) -> None:
        img = np.clip(rgb, 0, 255).astype(np.uint8)
        self._img = Image.fromarray(img)
        lab = np.full((self.size, self.size), labels, np.uint8) if np.isscalar(labels) else labels
        self._msk = Image.fromarray(np.ascontiguousarray(lab, dtype=np.uint8))
        self.draw = ImageDraw.Draw(self._img)
        self.mdraw = ImageDraw.Draw(self._msk)
        self._mask_np = None

    def textured(self, rgb: Sequence[int], medium: float = 0.06, coarse: float = 0.06, crown: float = 0.0):
        """Flat colour modulated by smooth noise (returns float32 H x W x 3)."""
        tex = 1.0 + medium * _crop(self.rng, "medium", self.size) + coarse * _crop(self.rng, "coarse", self.size)
        if crown:
            tex = tex + crown * _crop(self.rng, "crown", self.size)
        return tex[..., None] * np.asarray(rgb, np.float32)

    def region(self, shape: str, xy, rgb: Sequence[int], label: int | None, width: int = 0) -> None:
        fill = tuple(int(c) for c in rgb)
        if shape == "poly":
            self.draw.polygon(xy, fill=fill)
        elif shape == "ellipse":
            self.draw.ellipse(xy, fill=fill)
        elif shape == "line":
            self.draw.line(xy, fill=fill, width=width, joint="curve")
        if label is None:
            return
        if shape == "poly":
            self.mdraw.polygon(xy, fill=label)
        elif shape == "ellipse":
            self.mdraw.ellipse(xy, fill=label)
        elif shape == "line":
            self.mdraw.line(xy, fill=label, width=width, joint="curve")
        self._mask_np = None

    def rect_region(self, box: Box, rgb: Sequence[int], label: int | None) -> None:
        self.region("poly", _rect(*box), rgb, label)

    @property
    def mask_np(self) -> np.ndarray:
        if self._mask_np is None:
            self._mask_np = np.asarray(self._msk)
        return self._mask_np

    # --- placement
    def is_free(self, box: Box, pad: int) -> bool:
        x1, y1, x2, y2 = box
        return not self.occupied[max(0, y1 - pad) : y2 + pad, max(0, x1 - pad) : x2 + pad].any()

    def is_on(self, box: Box, allowed: Sequence[int]) -> bool:
        lut = np.zeros(256, bool)
        lut[list(allowed)] = True
        x1, y1, x2, y2 = box
        return bool(lut[self.mask_np[y1:y2, x1:x2]].all())

    def reserve(self, box: Box, pad: int) -> None:
        x1, y1, x2, y2 = box
        self.occupied[max(0, y1 - pad) : y2 + pad, max(0, x1 - pad) : x2 + pad] = True

    def find(
        self,
        w: int,
        h: int,
        allowed: Sequence[int],
        area: Box | None = None,
        pad: int | None = None,
        tries: int = 24,
    ) -> Box | None:
        """A random free box of w x h inside ``area`` lying on ``allowed`` labels, or None."""
        pad = self.S(2) + max(abs(self.sun[0]), abs(self.sun[1])) if pad is None else pad
        m = 1
        ax1, ay1, ax2, ay2 = area if area is not None else (0, 0, self.size, self.size)
        ax1, ay1, ax2, ay2 = max(ax1, m), max(ay1, m), min(ax2, self.size - m), min(ay2, self.size - m)
        if ax2 - ax1 < w or ay2 - ay1 < h:
            return None
        for _ in range(tries):
            x = int(self.rng.integers(ax1, ax2 - w + 1))
            y = int(self.rng.integers(ay1, ay2 - h + 1))
            box = (x, y, x + w, y + h)
            if self.is_free(box, pad) and self.is_on(box, allowed):
                return box
        return None

    def add(self, item: _Item, pad: int | None = None) -> int:
        pad = self.S(2) + max(abs(self.sun[0]), abs(self.sun[1])) if pad is None else pad
        self.reserve(item.box, pad)
        self.items.append(item)
        return len(self.items) - 1

    # --- objects (primitives are drawn at render time)
    def colour(self, cls: str) -> str:
        return _pick(self.rng, _COLOUR_WEIGHTS[cls])

    def building(self, box: Box, colour: str | None = None) -> _Item:
        colour = colour or self.colour("building")
        rgb = _jitter(self.rng, COLOURS[colour])
        x1, y1, x2, y2 = box
        dx, dy = self.sun
        prims: list[Prim] = [("poly", _rect(x1 + dx, y1 + dy, x2 + dx, y2 + dy), SHADOW, None)]
        prims.append(("poly", _rect(*box), rgb, BUILDING))
        w, h = x2 - x1, y2 - y1
        if self.rng.random() < 0.55:  # gable roof: a ridge along the long side, one half a bit darker
            dark = tuple(int(c * 0.82) for c in rgb)
            if w >= h:
                prims.append(("poly", _rect(x1, y1 + h // 2, x2, y2), dark, BUILDING))
            else:
                prims.append(("poly", _rect(x1 + w // 2, y1, x2, y2), dark, BUILDING))
        elif min(w, h) >= self.S(14) and self.rng.random() < 0.5:  # flat roof with rooftop units
            unit = tuple(int(c * 0.75) for c in rgb)
            u = self.S(3)
            prims.append(("poly", _rect(x1 + u, y1 + u, x1 + 2 * u, y1 + 2 * u), unit, BUILDING))
        return _Item("building", prims, box, colour, _size_word("building", max(w, h), self.size))

    def vehicle(
        self,
        x: int,
        y: int,
        along_x: bool,
        truck: bool = False,
        colour: str | None = None,
        length: int | None = None,
        width: int | None = None,
    ) -> _Item:
        """A car (8-10 px long) or truck/bus (13-16 px), cab or windscreen drawn across the body."""
        colour = colour or self.colour("vehicle")
        rgb = _jitter(self.rng, COLOURS[colour], 0.05)
        r = self.rng.random(3)
        length = length or self.S(13 + int(4 * r[0]) if truck else 8 + int(3 * r[0]))
        width = width or self.S(5 + int(2 * r[1]) if truck else 4 + int(2 * r[1]))
        glass = (30, 34, 40)
        front = r[2] < 0.5
        cab = max(1, length // 4)
        win = [(cab, 0), (cab + max(1, length // 8), width)]  # windscreen / cab gap across the body
        if not front:
            win = [(length - 1 - win[1][0], 0), (length - 1 - win[0][0], width)]
        local = [(_rect(0, 0, length, width), rgb), (_rect(win[0][0], 1, win[1][0] + 1, width - 1), glass)]
        return self._oriented("vehicle", local, x, y, length, width, 0 if along_x else 1, colour)

    def ship(self, x: int, y: int, length: int, width: int, quarter: int, colour: str | None = None) -> _Item:
        colour = colour or self.colour("ship")
        rgb = _jitter(self.rng, COLOURS[colour], 0.05)
        bow = max(2, width // 2 + 1)
        mid = (width - 1) // 2
        hull = [(0, 0), (length - 1 - bow, 0), (length - 1, mid), (length - 1 - bow, width - 1), (0, width - 1)]
        deck = (170, 170, 166) if colour != "white" else (120, 124, 128)
        house = _rect(
            max(1, length // 8), max(1, width // 4), max(2, length // 8 + length // 4), width - max(1, width // 4)
        )
        return self._oriented("ship", [(hull, rgb), (house, deck)], x, y, length, width, quarter, colour)

    def aircraft(self, x: int, y: int, span: int, quarter: int, colour: str | None = None) -> _Item:
        colour = colour or self.colour("aircraft")
        rgb = _jitter(self.rng, COLOURS[colour], 0.04)
        length = max(8, round(span * self.rng.uniform(0.85, 1.0)))
        c = span // 2
        fw = max(1, span // 14)  # half fuselage width
        wing_y, wing_t = round(length * 0.36), max(2, round(length * 0.14))
        tail_y, tail_w = round(length * 0.82), max(2, round(span * 0.2))
        # Nose pointing to local -y (up); box is span x length.
        fus = [(c - fw, 1), (c, 0), (c + fw, 1), (c + fw, length - 1), (c - fw, length - 1)]
        wings = [(c - fw, wing_y), (0, wing_y + wing_t), (0, wing_y + wing_t + max(1, wing_t // 2)),
                 (c, wing_y + wing_t), (span - 1, wing_y + wing_t + max(1, wing_t // 2)),
                 (span - 1, wing_y + wing_t), (c + fw, wing_y)]  # fmt: skip
        tail = [(c - fw, tail_y), (c - tail_w, length - 2), (c + tail_w, length - 2), (c + fw, tail_y)]
        return self._oriented("aircraft", [(wings, rgb), (tail, rgb), (fus, rgb)], x, y, span, length, quarter, colour)

    def _oriented(self, cls, local, x, y, w, h, quarter, colour) -> _Item:
        """Place local (w x h, x along length) polygons at (x, y) after quarter turns, with a shadow."""
        label = LABEL_INDEX[cls]
        ww, hh = (w, h) if quarter % 2 == 0 else (h, w)
        polys = [([(x + px, y + py) for px, py in _rotate(pts, w, h, quarter)], fill) for pts, fill in local]
        prims: list[Prim] = []
        if cls != "ship":  # ships sit on water: no cast shadow worth drawing
            dx, dy = (v // 2 if cls == "vehicle" else v for v in self.sun)
            prims += [("poly", [(px + dx, py + dy) for px, py in p], SHADOW, None) for p, _ in polys[:1]]
            if cls == "aircraft":
                prims += [("poly", [(px + dx, py + dy) for px, py in p], SHADOW, None) for p, _ in polys[1:]]
        prims += [("poly", p, fill, label) for p, fill in polys]
        box = (x, y, x + ww, y + hh)
        return _Item(cls, prims, box, colour, _size_word(cls, max(ww, hh), self.size))

    def tank(self, box: Box, colour: str | None = None) -> _Item:
        colour = colour or self.colour("storage tank")
        rgb = _jitter(self.rng, COLOURS[colour], 0.04)
        x1, y1, x2, y2 = box
        dx, dy = self.sun
        inset = max(1, (x2 - x1) // 6)
        ring = tuple(int(c * 0.8) for c in rgb)
        prims: list[Prim] = [
            ("ellipse", [x1 + dx, y1 + dy, x2 - 1 + dx, y2 - 1 + dy], SHADOW, None),
            ("ellipse", [x1, y1, x2 - 1, y2 - 1], rgb, TANK),
            ("ellipse", [x1 + inset, y1 + inset, x2 - 1 - inset, y2 - 1 - inset], ring, TANK),
            ("ellipse", [x1 + inset + 1, y1 + inset + 1, x2 - 2 - inset, y2 - 2 - inset], rgb, TANK),
        ]
        return _Item("storage tank", prims, box, colour, _size_word("storage tank", x2 - x1, self.size))

    def tree(self, cx: int, cy: int, r: int) -> None:
        self.region("ellipse", [cx - r, cy - r, cx + r, cy + r], _jitter(self.rng, TREE, 0.15), VEGETATION)
        self.reserve((cx - r, cy - r, cx + r + 1, cy + r + 1), 1)
        self.facts["trees"] = self.facts.get("trees", 0) + 1

    def trees(self, n: int, allowed: Sequence[int] = (OTHERS,), area: Box | None = None) -> None:
        for _ in range(n):
            r = self.S(self.rng.uniform(2, 5))
            box = self.find(2 * r + 1, 2 * r + 1, allowed, area, pad=0, tries=6)
            if box is not None:
                self.tree(box[0] + r, box[1] + r, r)

    # --- composite helpers
    def straight_road(self, horizontal: bool, at: int, width: int, rgb=ASPHALT, label: int = ROAD) -> Box:
        box = (0, at, self.size, at + width) if horizontal else (at, 0, at + width, self.size)
        self.rect_region(box, _jitter(self.rng, rgb, 0.05), label)
        self.facts.setdefault("roads", []).append((horizontal, box))
        return box

    def cars_on_road(self, road: Box, horizontal: bool, n: int, truck_p: float = 0.15) -> int:
        placed = 0
        for _ in range(n):
            truck = self.rng.random() < truck_p
            lw = self.S(16 if truck else 10)
            lt = self.S(6 if truck else 5)
            x1, y1, x2, y2 = road
            if horizontal:
                if y2 - y1 < lt + 2:
                    continue
                box = self.find(lw, lt, (ROAD,), (x1, y1 + 1, x2, y2 - 1), pad=self.S(2))
            else:
                if x2 - x1 < lt + 2:
                    continue
                box = self.find(lt, lw, (ROAD,), (x1 + 1, y1, x2 - 1, y2), pad=self.S(2))
            if box is None:
                continue
            item = self.vehicle(box[0], box[1], horizontal, truck)
            if not self.is_free(item.box, self.S(2)) or not self.is_on(item.box, (ROAD,)):
                continue
            self.add(item, self.S(2))
            placed += 1
        return placed

    def buildings_along(self, road: Box, horizontal: bool, limit: int, lo: int = 10, hi: int = 18) -> int:
        """Rows of buildings on both sides of a straight road, set back a few pixels."""
        placed = 0
        x1, y1, x2, y2 = road
        for side in (0, 1):
            pos = int(self.rng.integers(1, self.S(10)))
            gap = self.S(self.rng.integers(2, 6))
            while pos < self.size and placed < limit:
                w, d = self.S(self.rng.integers(lo, hi + 1)), self.S(self.rng.integers(lo, hi + 1))
                if horizontal:
                    by = y1 - gap - d if side == 0 else y2 + gap
                    box = (pos, by, pos + w, by + d)
                else:
                    bx = x1 - gap - d if side == 0 else x2 + gap
                    box = (bx, pos, bx + d, pos + w)
                pos += w + self.S(self.rng.integers(3, 8))
                if min(box) < 1 or max(box) > self.size - 1:
                    continue
                if self.is_free(box, self.S(2) + 2) and self.is_on(box, (OTHERS,)):
                    self.add(self.building(box))
                    placed += 1
        return placed

    def scatter_buildings(self, n: int, lo: int = 10, hi: int = 20, area: Box | None = None, on=(OTHERS,)) -> int:
        placed = 0
        for _ in range(n):
            w, h = self.S(self.rng.integers(lo, hi + 1)), self.S(self.rng.integers(lo, hi + 1))
            box = self.find(w, h, on, area)
            if box is not None:
                self.add(self.building(box))
                placed += 1
        return placed

    def tanks(self, n: int, area: Box | None, lo: int = 10, hi: int = 22, on=(OTHERS,)) -> int:
        placed = 0
        base = int(self.rng.integers(lo, hi + 1))
        for _ in range(n):
            d = self.S(base + self.rng.integers(-2, 3) if self.rng.random() < 0.7 else self.rng.integers(lo, hi + 1))
            box = self.find(d, d, on, area) or self.find(d, d, on)
            if box is not None:
                self.add(self.tank(box))
                placed += 1
        return placed

    def layout(self) -> Layout:
        return Layout(
            scene_class=self.scene_class,
            size=self.size,
            base=np.asarray(self._img).copy(),
            base_mask=np.asarray(self._msk).copy(),
            items=self.items,
            occupied=self.occupied,
            sun=self.sun,
            facts=self.facts,
        )


# ------------------------------------------------------------------------------------------------- layouts


def _split(rng: np.random.Generator, total: int, n: int) -> list[int]:
    """Cut points 0 = c0 < ... < cn = total with roughly even, jittered spacing."""
    weights = rng.uniform(0.6, 1.4, n)
    cuts = np.round(np.cumsum(weights) / weights.sum() * total).astype(int)
    return [0, *[int(c) for c in cuts[:-1]], total]


def _farmland(b: _Builder) -> None:
    rng, size = b.rng, b.size
    rgb = np.empty((size, size, 3), np.float32)
    lab = np.zeros((size, size), np.uint8)
    palette = [((72, 118, 48), VEGETATION), ((118, 148, 70), VEGETATION), ((96, 132, 60), VEGETATION),
               ((188, 168, 102), OTHERS), ((140, 110, 78), OTHERS), ((104, 84, 62), OTHERS)]  # fmt: skip
    cols = _split(rng, size, int(rng.integers(2, 5)))
    tex = 1.0 + 0.05 * _crop(rng, "medium", size)
    for ci in range(len(cols) - 1):
        rows = _split(rng, size, int(rng.integers(2, 5)))
        for ri in range(len(rows) - 1):
            x1, x2, y1, y2 = cols[ci], cols[ci + 1], rows[ri], rows[ri + 1]
            colour, label = palette[int(rng.integers(len(palette)))]
            rgb[y1:y2, x1:x2] = _jitter(rng, colour, 0.06)
            lab[y1:y2, x1:x2] = label
            k = b.S(rng.integers(3, 6))
            if rng.random() < 0.5:  # crop rows
                rgb[y1:y2:k, x1:x2] *= 0.84
            else:
                rgb[y1:y2, x1:x2:k] *= 0.84
            rgb[y1, x1:x2] = (170, 160, 130)  # field boundary tracks
            rgb[y1:y2, x1] = (170, 160, 130)
    transposed = rng.random() < 0.5
    if transposed:
        rgb, lab = rgb.transpose(1, 0, 2), lab.T
    b.set_ground(rgb * tex[..., None], np.ascontiguousarray(lab))
    b.facts["fields"] = (len(cols) - 1) * 3
    if rng.random() < 0.6:
        horizontal = rng.random() < 0.5
        road = b.straight_road(horizontal, int(rng.integers(b.S(20), size - b.S(28))), b.S(rng.integers(5, 8)))
        b.buildings_along(road, horizontal, int(rng.integers(0, 4)), 9, 14)
        b.cars_on_road(road, horizontal, int(rng.integers(0, 3)), truck_p=0.4)


def _forest(b: _Builder) -> None:
    rng, size = b.rng, b.size
    canopy = b.textured(_jitter(rng, (48, 88, 46), 0.1), medium=0.12, coarse=0.1, crown=0.22)
    b.set_ground(canopy, VEGETATION)
    if rng.random() < 0.35:  # clearing
        r = b.S(rng.integers(14, 26))
        cx, cy = (int(v) for v in rng.integers(r + 2, size - r - 2, 2))
        b.region("ellipse", [cx - r, cy - r, cx + r, cy + r], _jitter(rng, (146, 136, 96)), OTHERS)
        b.facts["clearing"] = True
        b.scatter_buildings(int(rng.integers(0, 3)), 9, 14, area=(cx - r, cy - r, cx + r, cy + r))
    if rng.random() < 0.4:
        horizontal = rng.random() < 0.5
        at = int(rng.integers(b.S(10), size - b.S(18)))
        road = b.straight_road(horizontal, at, b.S(rng.integers(5, 8)), rgb=(128, 116, 92))
        b.cars_on_road(road, horizontal, int(rng.integers(0, 3)))


def _residential(b: _Builder) -> None:
    rng, size = b.rng, b.size
    b.set_ground(b.textured(_jitter(rng, (124, 134, 96), 0.08), medium=0.07, coarse=0.08), OTHERS)
    roads: list[tuple[bool, Box]] = []
    n_h, n_v = int(rng.integers(0, 3)), int(rng.integers(0, 3))
    if n_h + n_v == 0:
        n_h = 1
    width = b.S(rng.integers(8, 14))  # urban roads: wide enough to win grid cells in [SEG] answers
    for horizontal, n in ((True, n_h), (False, n_v)):
        cuts = _split(rng, size, n + 1)[1:-1]
        for c in cuts:
            roads.append((horizontal, b.straight_road(horizontal, c - width // 2, width)))
    limit = int(rng.integers(3, 14))
    placed = 0
    for horizontal, road in roads:
        placed += b.buildings_along(road, horizontal, (limit - placed) // 2 + 1)
        if placed >= limit:
            break
    if placed < limit:
        b.scatter_buildings(limit - placed, 10, 16)
    b.trees(int(rng.integers(3, 14)))
    for horizontal, road in roads:
        b.cars_on_road(road, horizontal, int(rng.integers(0, 3)))


def _industrial(b: _Builder) -> None:
    rng, size = b.rng, b.size
    b.set_ground(b.textured(_jitter(rng, CONCRETE, 0.06), medium=0.05, coarse=0.06), OTHERS)
    horizontal = rng.random() < 0.5
    road = b.straight_road(horizontal, int(rng.integers(b.S(16), size - b.S(24))), b.S(rng.integers(9, 14)))
    for _ in range(int(rng.integers(1, 4))):  # warehouses
        w, h = b.S(rng.integers(18, 34)), b.S(rng.integers(14, 24))
        box = b.find(w, h, (OTHERS,))
        if box is not None:
            b.add(b.building(box, _pick(rng, {"gray": 0.4, "white": 0.3, "blue": 0.3})))
    half = size // 2
    corner = (int(rng.integers(0, 2)) * half, int(rng.integers(0, 2)) * half)
    area = (corner[0], corner[1], corner[0] + half + b.S(8), corner[1] + half + b.S(8))
    b.tanks(int(rng.integers(1, 7)), area)
    b.cars_on_road(road, horizontal, int(rng.integers(0, 4)), truck_p=0.6)
    b.trees(int(rng.integers(0, 4)))


def _harbor(b: _Builder) -> None:
    rng, size = b.rng, b.size
    b.set_ground(b.textured(_jitter(rng, (150, 146, 136), 0.06), medium=0.05, coarse=0.05), OTHERS)
    side = ("left", "right", "top", "bottom")[int(rng.integers(4))]
    depth = int(size * rng.uniform(0.4, 0.6))
    water_rgb = _jitter(rng, WATER_RGB, 0.1)

    # The water rectangle, in a frame where the water is on the left; mapped to the chosen side.
    def to_side(x1: int, y1: int, x2: int, y2: int) -> Box:
        if side == "left":
            return (x1, y1, x2, y2)
        if side == "right":
            return (size - x2, y1, size - x1, y2)
        if side == "top":
            return (y1, x1, y2, x2)
        return (y1, size - x2, y2, size - x1)

    b.rect_region(to_side(0, 0, depth, size), water_rgb, WATER)
    b.facts["water_side"] = side
    quay = (200, 196, 186)
    piers = []
    for c in _split(rng, size, int(rng.integers(2, 4)) + 1)[1:-1]:
        pw = b.S(rng.integers(4, 7))
        length = int(depth * rng.uniform(0.4, 0.8))
        pier = to_side(depth - length, c - pw // 2, depth, c - pw // 2 + pw)
        b.rect_region(pier, quay, OTHERS)
        b.reserve(pier, 0)
        piers.append(pier)
    b.facts["piers"] = len(piers)
    along_x = side in ("left", "right")  # ships lie parallel to the piers
    for _ in range(int(rng.integers(1, 7))):
        length, width = b.S(rng.integers(14, 34)), b.S(rng.integers(5, 9))
        w, h = (length, width) if along_x else (width, length)
        box = b.find(w, h, (WATER,), pad=b.S(2))
        if box is None:
            continue
        quarter = int(rng.choice([0, 2])) if along_x else int(rng.choice([1, 3]))
        b.add(b.ship(box[0], box[1], length, width, quarter), pad=b.S(2))
    land = to_side(depth, 0, size, size)
    b.scatter_buildings(int(rng.integers(0, 4)), 12, 24, area=land)
    if rng.random() < 0.5:
        b.tanks(int(rng.integers(1, 4)), land)
    b.trees(int(rng.integers(0, 4)), area=land)


def _airport(b: _Builder) -> None:
    rng, size = b.rng, b.size
    b.set_ground(b.textured(_jitter(rng, (118, 138, 80), 0.08), medium=0.06, coarse=0.08), VEGETATION)
    horizontal = rng.random() < 0.5
    rw = b.S(rng.integers(11, 15))
    at = int(rng.integers(b.S(6), size - rw - b.S(6)))
    runway = b.straight_road(horizontal, at, rw, rgb=(74, 75, 80), label=OTHERS)
    del b.facts["roads"]  # a runway is not a road
    b.facts["runway"] = "horizontal" if horizontal else "vertical"
    mid = at + rw // 2
    for p in range(0, size, b.S(12)):  # centre-line dashes
        dash = (p, mid, p + b.S(6), mid + 1) if horizontal else (mid, p, mid + 1, p + b.S(6))
        b.rect_region(dash, (230, 230, 226), None)
    b.reserve(runway, 0)
    # The apron lies on the wider side of the runway, joined to it by a taxiway.
    above = at > size - (at + rw)
    gap = b.S(rng.integers(6, 12))
    t = int(rng.integers(b.S(10), size - b.S(20)))
    tw = b.S(6)
    if horizontal:
        apron = (0, b.S(2), size, at - gap) if above else (0, at + rw + gap, size, size - b.S(2))
        taxi = (t, at - gap, t + tw, at) if above else (t, at + rw, t + tw, at + rw + gap)
    else:
        apron = (b.S(2), 0, at - gap, size) if above else (at + rw + gap, 0, size - b.S(2), size)
        taxi = (at - gap, t, at, t + tw) if above else (at + rw, t, at + rw + gap, t + tw)
    b.rect_region(apron, _jitter(rng, (166, 164, 158), 0.05), OTHERS)
    b.rect_region(taxi, (110, 110, 112), OTHERS)
    b.reserve(taxi, 0)
    # Terminal along the far edge of the apron.
    tl, td = b.S(rng.integers(26, 44)), b.S(rng.integers(10, 16))
    ax1, ay1, ax2, ay2 = apron
    if horizontal:
        strip = (ax1, ay1, ax2, ay1 + td + 2) if above else (ax1, ay2 - td - 2, ax2, ay2)
        tb = b.find(tl, td, (OTHERS,), strip)
    else:
        strip = (ax1, ay1, ax1 + td + 2, ay2) if above else (ax2 - td - 2, ay1, ax2, ay2)
        tb = b.find(td, tl, (OTHERS,), strip)
    if tb is not None:
        b.add(b.building(tb, _pick(rng, {"white": 0.4, "gray": 0.4, "blue": 0.2})))
    quarter = _nose_quarter(horizontal, above)
    for _ in range(int(rng.integers(1, 6))):
        span = b.S(rng.integers(16, 34))
        box = b.find(span, span, (OTHERS,), apron, pad=b.S(3))
        if box is None:
            continue
        item = b.aircraft(box[0], box[1], span, quarter)
        if b.is_free(item.box, b.S(3)) and b.is_on(item.box, (OTHERS,)):
            b.add(item, pad=b.S(3))
    for _ in range(int(rng.integers(0, 3))):  # service vehicles on the apron
        box = b.find(b.S(10), b.S(5), (OTHERS,), apron, pad=b.S(2))
        if box is not None:
            b.add(b.vehicle(box[0], box[1], True, colour=_pick(rng, {"white": 0.5, "yellow": 0.5})), b.S(2))


def _nose_quarter(horizontal_runway: bool, apron_above: bool) -> int:
    """Quarter turns for an aircraft (nose up at 0) so that it faces the runway."""
    if horizontal_runway:
        return 2 if apron_above else 0  # apron above the runway: nose down
    return 1 if apron_above else 3  # apron left of the runway: nose right


def _meander(b: _Builder, horizontal: bool, width: int) -> list[tuple[int, int]]:
    rng, size = b.rng, b.size
    amp = size * rng.uniform(0.05, 0.16)
    wave = size * rng.uniform(0.6, 1.4)
    phase = rng.uniform(0, 2 * math.pi)
    base = size * rng.uniform(0.3, 0.7)
    step = max(2, b.S(5))
    pts = []
    for t in range(-step * 2, size + step * 3, step):
        off = base + amp * math.sin(2 * math.pi * t / wave + phase) + rng.uniform(-1, 1) * b.s
        pts.append((t, round(off)) if horizontal else (round(off), t))
    b.facts["river"] = "horizontal" if horizontal else "vertical"
    return pts


def _river(b: _Builder) -> None:
    rng, size = b.rng, b.size
    green = rng.random() < 0.6
    ground = (96, 128, 64) if green else (150, 138, 100)
    b.set_ground(
        b.textured(_jitter(rng, ground, 0.08), medium=0.08, coarse=0.1, crown=0.05), VEGETATION if green else OTHERS
    )
    horizontal = rng.random() < 0.5
    width = b.S(rng.integers(10, 20))
    pts = _meander(b, horizontal, width)
    b.region("line", pts, _jitter(rng, (176, 164, 126)), OTHERS, width=width + b.S(5))  # banks
    b.region("line", pts, _jitter(rng, WATER_RGB, 0.12), WATER, width=width)
    water = b.mask_np == WATER
    b.occupied |= water  # keep land objects off the river
    if rng.random() < 0.4:  # a bridge across
        c = int(rng.integers(b.S(24), size - b.S(30)))
        road = b.straight_road(not horizontal, c, b.S(rng.integers(5, 8)))
        b.cars_on_road(road, not horizontal, int(rng.integers(0, 3)))
    if width >= b.S(12) and rng.random() < 0.35:  # a boat on the river
        b.occupied &= ~water
        length = b.S(rng.integers(14, 20))
        beam = max(b.S(5), 4)
        w, h = (length, beam) if horizontal else (beam, length)
        box = b.find(w, h, (WATER,), pad=b.S(2))
        if box is not None:
            quarter = int(rng.choice([0, 2])) if horizontal else int(rng.choice([1, 3]))
            b.add(b.ship(box[0], box[1], length, beam, quarter), b.S(2))
        b.occupied |= water
    b.scatter_buildings(int(rng.integers(0, 4)), 10, 16, on=(OTHERS, VEGETATION))
    b.trees(int(rng.integers(4, 14)), allowed=(OTHERS, VEGETATION))


def _lake(b: _Builder) -> None:
    rng, size = b.rng, b.size
    b.set_ground(b.textured(_jitter(rng, GRASS, 0.08), medium=0.08, coarse=0.1, crown=0.06), VEGETATION)
    r0 = size * rng.uniform(0.2, 0.34)
    cx, cy = (size * rng.uniform(0.38, 0.62) for _ in range(2))
    amps = rng.uniform(0.0, 0.12, 3)
    phases = rng.uniform(0, 2 * math.pi, 3)
    n = 28
    pts, shore = [], []
    for i in range(n):
        a = 2 * math.pi * i / n
        r = r0 * (1 + sum(amps[k] * math.sin((k + 2) * a + phases[k]) for k in range(3)))
        pts.append((round(cx + r * math.cos(a)), round(cy + r * math.sin(a))))
        shore.append((round(cx + (r + 3 * b.s) * math.cos(a)), round(cy + (r + 3 * b.s) * math.sin(a))))
    b.region("poly", shore, _jitter(rng, (172, 160, 120)), OTHERS)
    b.region("poly", pts, _jitter(rng, WATER_RGB, 0.12), WATER)
    water = b.mask_np == WATER
    b.facts["lake"] = True
    for _ in range(int(rng.integers(0, 3)) if rng.random() < 0.4 else 0):
        length, beam = b.S(rng.integers(12, 18)), b.S(5)
        horizontal = rng.random() < 0.5
        box = b.find(length if horizontal else beam, beam if horizontal else length, (WATER,), pad=b.S(3))
        if box is not None:
            q = int(rng.choice([0, 2])) if horizontal else int(rng.choice([1, 3]))
            b.add(b.ship(box[0], box[1], length, beam, q), b.S(3))
    b.occupied |= water
    if rng.random() < 0.5:
        horizontal = rng.random() < 0.5
        at = int(rng.choice([b.S(6), size - b.S(14)]))
        road = b.straight_road(horizontal, at, b.S(6))
        b.cars_on_road(road, horizontal, int(rng.integers(0, 2)))
    b.scatter_buildings(int(rng.integers(0, 5)), 10, 16, on=(VEGETATION,))
    b.trees(int(rng.integers(3, 12)), allowed=(VEGETATION,))


_DUNE = np.asarray([i / 204 if i < 204 else (255 - i) / 51 for i in range(256)], np.float32)  # slow rise, slip face


def _desert(b: _Builder) -> None:
    rng, size = b.rng, b.size
    theta = rng.uniform(0, math.pi)
    wave = size * rng.uniform(0.12, 0.3)
    c, s = math.cos(theta) / wave, math.sin(theta) / wave
    coords = np.arange(size, dtype=np.float32)
    phase = (
        coords[None, :] * c + coords[:, None] * s + 0.6 * _crop(rng, "coarse", size) + 0.1 * _crop(rng, "medium", size)
    )
    idx = (phase * 256).astype(np.int64) & 255  # wraps like phase mod 1, without trigonometry
    shade = 0.82 + 0.28 * _DUNE[idx]
    sand = np.asarray(_jitter(rng, SAND, 0.06), np.float32)
    b.set_ground(shade[..., None] * sand, OTHERS)
    if rng.random() < 0.3:
        horizontal = rng.random() < 0.5
        road = b.straight_road(horizontal, int(rng.integers(b.S(10), size - b.S(18))), b.S(6), rgb=(112, 104, 92))
        b.cars_on_road(road, horizontal, int(rng.integers(0, 3)), truck_p=0.5)
    if rng.random() < 0.2:
        b.scatter_buildings(int(rng.integers(1, 4)), 10, 18)


def _parking(b: _Builder) -> None:
    rng, size = b.rng, b.size
    b.set_ground(b.textured(_jitter(rng, (140, 140, 128), 0.06), medium=0.05, coarse=0.06), OTHERS)
    rows_along_x = rng.random() < 0.5
    m = b.S(rng.integers(4, 20))
    lot = (m, m, size - b.S(rng.integers(4, 20)), size - b.S(rng.integers(4, 20)))
    b.rect_region(lot, _jitter(rng, (76, 77, 82), 0.06), OTHERS)
    b.facts["lot"] = True
    # A car park, or (about a third) a depot of trucks and buses packed in tight rows, as in DOTA.
    depot = rng.random() < 0.35
    b.facts["depot"] = depot
    car_l, car_w = (b.S(15), b.S(6)) if depot else (b.S(10), b.S(5))
    stall, aisle = car_w + b.S(2 if depot else 3), b.S(rng.integers(8, 12))
    line = (214, 214, 206)
    x1, y1, x2, y2 = lot
    # Double rows of stalls separated by driving aisles; vehicles are perpendicular to the rows.
    depth = 2 * car_l + b.S(4)
    p = (y1 if rows_along_x else x1) + b.S(3)
    end = y2 if rows_along_x else x2
    fill = rng.uniform(0.75, 1.0) if depot else rng.uniform(0.45, 0.95)
    colours = (
        {"white": 0.45, "gray": 0.2, "yellow": 0.15, "blue": 0.1, "red": 0.1}
        if depot
        else {"white": 0.3, "gray": 0.15, "dark": 0.22, "red": 0.14, "blue": 0.12, "yellow": 0.07}
    )
    size_kw = {"truck": True, "length": car_l - b.S(1), "width": car_w} if depot else {}
    while p + depth <= end - b.S(2):
        q = (x1 if rows_along_x else y1) + b.S(3)
        qend = x2 if rows_along_x else y2
        while q + stall <= qend - b.S(2):
            for half in (0, 1):
                a = p + half * (car_l + b.S(4))
                sb = (q, a, q + 1, a + car_l + b.S(1)) if rows_along_x else (a, q, a + car_l + b.S(1), q + 1)
                b.rect_region(sb, line, None)
                if rng.random() < fill:
                    cx = q + b.S(2 if not depot else 1)
                    if rows_along_x:
                        item = b.vehicle(cx, a + b.S(1), False, colour=_pick(rng, colours), **size_kw)
                    else:
                        item = b.vehicle(a + b.S(1), cx, True, colour=_pick(rng, colours), **size_kw)
                    if b.is_free(item.box, 1):
                        b.add(item, 1)
            q += stall
        p += depth + aisle
    outside = [(0, 0, size, y1), (0, y2, size, size), (0, 0, x1, size), (x2, 0, size, size)]
    for area in outside:
        if rng.random() < 0.35:
            b.scatter_buildings(1, 10, 16, area=area)
    b.trees(int(rng.integers(0, 8)))


def _bareland(b: _Builder) -> None:
    rng, size = b.rng, b.size
    b.set_ground(b.textured(_jitter(rng, SOIL, 0.1), medium=0.1, coarse=0.14, crown=0.04), OTHERS)
    b.facts["tracks"] = True
    for _ in range(int(rng.integers(1, 4))):  # vehicle tracks
        pts = [
            (int(rng.integers(0, size)), 0),
            (int(rng.integers(0, size)), size // 2),
            (int(rng.integers(0, size)), size),
        ]
        if rng.random() < 0.5:
            pts = [(y, x) for x, y in pts]
        b.region("line", pts, _jitter(rng, (186, 164, 130)), None, width=max(1, b.S(1)))
    for _ in range(int(rng.integers(0, 8))):  # scrub patches
        r = b.S(rng.uniform(3, 8))
        cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
        b.region("ellipse", [cx - r, cy - r, cx + r, cy + r], _jitter(rng, (104, 112, 70), 0.1), VEGETATION)
    b.scatter_buildings(int(rng.integers(0, 3)), 10, 18)
    for _ in range(int(rng.integers(0, 3))):
        box = b.find(b.S(16), b.S(16), (OTHERS,))
        if box is not None:
            b.add(b.vehicle(box[0], box[1], rng.random() < 0.5, truck=rng.random() < 0.5), b.S(2))


def _meadow(b: _Builder) -> None:
    rng, size = b.rng, b.size
    b.set_ground(b.textured(_jitter(rng, (104, 142, 62), 0.1), medium=0.1, coarse=0.12, crown=0.08), VEGETATION)
    if rng.random() < 0.5:  # a footpath
        pts = [
            (0, int(rng.integers(0, size))),
            (size // 2, int(rng.integers(0, size))),
            (size, int(rng.integers(0, size))),
        ]
        b.region("line", pts, _jitter(rng, (170, 156, 120)), OTHERS, width=b.S(2))
        b.facts["path"] = True
    for _ in range(int(rng.integers(0, 4))):  # tree clumps
        cx, cy = (int(v) for v in rng.integers(0, size, 2))
        for _ in range(int(rng.integers(2, 6))):
            r = b.S(rng.uniform(2, 5))
            b.tree(cx + int(rng.integers(-8, 9)), cy + int(rng.integers(-8, 9)), r)
    if rng.random() < 0.25:
        b.scatter_buildings(1, 10, 14, on=(VEGETATION,))


_LAYOUTS: dict[str, Callable[[_Builder], None]] = {
    "farmland": _farmland,
    "forest": _forest,
    "residential": _residential,
    "industrial": _industrial,
    "harbor": _harbor,
    "airport": _airport,
    "river": _river,
    "lake": _lake,
    "desert": _desert,
    "parking": _parking,
    "bareland": _bareland,
    "meadow": _meadow,
}

# ---------------------------------------------------------------------------------------------- rendering

# Extra texture per label, so flat regions drawn with Pillow do not look painted.
_TEXTURE = np.asarray([0.03, 0.02, 0.03, 0.05, 0.08, 0.0, 0.0, 0.0, 0.0], np.float32)


def _draw_prim(draw: ImageDraw.ImageDraw, mdraw: ImageDraw.ImageDraw, prim: Prim) -> None:
    shape, xy, fill, label = prim
    if shape == "poly":
        draw.polygon(xy, fill=fill)
        if label is not None:
            mdraw.polygon(xy, fill=label)
    else:
        draw.ellipse(xy, fill=fill)
        if label is not None:
            mdraw.ellipse(xy, fill=label)


def render(layout: Layout, rng: np.random.Generator, visible: Sequence[int] | None = None) -> Scene:
    """Draw ``layout`` with the items in ``visible`` (all when None) under fresh lighting and noise."""
    ids = range(len(layout.items)) if visible is None else sorted(visible)
    img = Image.fromarray(layout.base)
    msk = Image.fromarray(layout.base_mask)
    draw, mdraw = ImageDraw.Draw(img), ImageDraw.Draw(msk)
    # Ground patches, then all shadows, then the objects: a shadow never covers a neighbour's roof.
    items = [layout.items[i] for i in ids]
    for item in items:
        if item.kind == "patch":
            for prim in item.prims:
                _draw_prim(draw, mdraw, prim)
    for item in items:
        for prim in item.prims:
            if item.kind != "patch" and prim[3] is None and prim[2] == SHADOW:
                _draw_prim(draw, mdraw, prim)
    for item in items:
        for prim in item.prims:
            if item.kind != "patch" and not (prim[3] is None and prim[2] == SHADOW):
                _draw_prim(draw, mdraw, prim)
    mask = np.asarray(msk).copy()
    size = layout.size
    arr = np.asarray(img, dtype=np.float32)
    gain = rng.uniform(0.86, 1.12) * rng.uniform(0.95, 1.05, 3).astype(np.float32)
    haze = np.float32(rng.uniform(0, 14))
    sigma = np.float32(rng.uniform(1.5, 4.5))
    tex = 1.0 + _TEXTURE[layout.base_mask] * _crop(rng, "crown", size)
    arr = arr * tex[..., None] * gain + (haze + sigma * _crop(rng, "fine", size))
    image = np.clip(arr, 0, 255).astype(np.uint8)
    objects = []
    for i in ids:
        item = layout.items[i]
        if item.kind not in OBJECT_CLASSES:
            continue
        objects.append(
            SceneObject(item.kind, _tight_box(mask, item.box, LABEL_INDEX[item.kind]), item.colour, item.size)
        )
    return Scene(image, mask, LABELS, layout.scene_class, objects, size, layout, frozenset(ids))


def _tight_box(mask: np.ndarray, box: Box, label: int) -> Box:
    """The exact pixel extent of an object, read back from the label mask near its geometric box."""
    x1, y1, x2, y2 = box
    h, w = mask.shape
    ox, oy = max(0, x1 - 2), max(0, y1 - 2)
    sub = mask[oy : min(h, y2 + 2), ox : min(w, x2 + 2)] == label
    rows, cols = sub.any(axis=1), sub.any(axis=0)
    if not rows.any():
        return box
    top, left = int(rows.argmax()), int(cols.argmax())
    bottom, right = rows.size - int(rows[::-1].argmax()), cols.size - int(cols[::-1].argmax())
    return (ox + left, oy + top, ox + right, oy + bottom)


def generate_scene(rng: np.random.Generator, size: int = 128, scene_class: str | None = None) -> Scene:
    """A random aerial scene of ``scene_class`` (random class when None), ``size`` x ``size`` px."""
    if scene_class is None:
        scene_class = SCENE_CLASSES[int(rng.integers(len(SCENE_CLASSES)))]
    if scene_class not in _LAYOUTS:
        raise ValueError(f"unknown scene class {scene_class!r}; known: {', '.join(SCENE_CLASSES)}")
    b = _Builder(rng, size, scene_class)
    _LAYOUTS[scene_class](b)
    return render(b.layout(), rng)


# ------------------------------------------------------------------------------------------- change pairs

REGION_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "upper left",
    (0, 1): "top",
    (0, 2): "upper right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "lower left",
    (2, 1): "bottom",
    (2, 2): "lower right",
}


def region_of(x: float, y: float, size: int) -> str:
    """3x3 region name of a point."""
    return REGION_NAMES[(min(2, int(3 * y / size)), min(2, int(3 * x / size)))]


def _cell_box(region: str, size: int) -> Box:
    (r, c) = next(k for k, v in REGION_NAMES.items() if v == region)
    return (c * size // 3, r * size // 3, (c + 1) * size // 3, (r + 1) * size // 3)


def mask_grid(mask: np.ndarray, grid: int = 8, threshold: float = 0.5) -> np.ndarray:
    """Cells (grid x grid, bool) that ``mask`` covers for at least ``threshold`` of their area (majority vote).

    Cell edges are ``floor(i * side / grid)``, so sides that ``grid`` does not divide still work.
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    if h % grid == 0 and w % grid == 0:  # the common case: an exact reshape
        frac = mask.reshape(grid, h // grid, grid, w // grid).mean(axis=(1, 3))
    else:
        ys = (np.arange(grid) * h) // grid
        xs = (np.arange(grid) * w) // grid
        sums = np.add.reduceat(np.add.reduceat(mask.astype(np.int64), ys, axis=0), xs, axis=1)
        hs = np.diff(np.r_[ys, h])
        ws = np.diff(np.r_[xs, w])
        frac = sums / (hs[:, None] * ws[None, :])
    return frac >= threshold


def marks_a_cell(mask: np.ndarray, grid: int = 8, threshold: float = 0.5) -> bool:
    """True when a binary mask fills at least ``threshold`` of some cell of the grid."""
    return bool(mask_grid(mask, grid, threshold).any())


def make_change_pair(rng: np.random.Generator, scene: Scene, kind: str | None = None, grid: int = 8) -> ChangePair:
    """Before and after images of ``scene``'s place: buildings added, removed, or no change (~20%).

    ``before`` is ``scene`` itself, re-rendered when buildings are added (the construction site may be
    cleared already). ``after`` always has its own lighting and noise.

    Changed buildings are clustered in one 3x3 region, and each covers most of at least one cell of the
    ``grid`` x ``grid`` change mask, so the change caption and the change mask agree.
    """
    lay = scene.layout
    size = lay.size
    if kind is None:
        u = rng.random()
        kind = "none" if u < 0.2 else ("added" if u < 0.62 else "removed")
    b = _Builder(rng, size, lay.scene_class)
    b.items, b.occupied, b.sun = list(lay.items), lay.occupied.copy(), lay.sun
    b._msk, b._mask_np = None, lay.base_mask
    visible_before = set(scene.visible)
    visible_after = set(scene.visible)
    changed: list[int] = []
    if kind == "removed":
        changed = _pick_removal(rng, scene, grid)
        if not changed:
            kind = "added"
        else:
            visible_after -= set(changed)
            for i in changed:  # demolished ground: bare soil where the building stood
                x1, y1, x2, y2 = lay.items[i].box
                patch = _Item("patch", [("poly", _rect(x1, y1, x2, y2), _jitter(rng, SOIL), OTHERS)], lay.items[i].box)
                b.items.append(patch)
                visible_after.add(len(b.items) - 1)
    if kind == "added":
        changed = _add_buildings(rng, b, lay, grid, visible_before, visible_after)
        if not changed:
            kind = "none"
    new_layout = Layout(lay.scene_class, size, lay.base, lay.base_mask, b.items, b.occupied, lay.sun, lay.facts)
    before = render(new_layout, rng, sorted(visible_before)) if kind == "added" else scene
    if before is scene:
        before = Scene(
            scene.image, scene.mask, scene.labels, scene.scene_class, scene.objects, size, new_layout, scene.visible
        )
    after = render(new_layout, rng, sorted(visible_after))
    mask = np.zeros((size, size), dtype=bool)
    boxes: list[Box] = []
    for i in changed:
        src = before if kind == "removed" else after
        x1, y1, x2, y2 = b.items[i].box
        mask[y1:y2, x1:x2] |= src.mask[y1:y2, x1:x2] == BUILDING
        boxes.append(_tight_box(src.mask, b.items[i].box, BUILDING))
    region = None
    if boxes:
        cx = (min(bx[0] for bx in boxes) + max(bx[2] for bx in boxes)) / 2
        cy = (min(bx[1] for bx in boxes) + max(bx[3] for bx in boxes)) / 2
        region = region_of(cx, cy, size)
    return ChangePair(before, after, mask, kind, len(changed), region, boxes)


def _single_mask(box: Box, size: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[box[1] : box[3], box[0] : box[2]] = True
    return m


def _pick_removal(rng: np.random.Generator, scene: Scene, grid: int) -> list[int]:
    """Visible buildings of one 3x3 region that each mark a change-grid cell (up to 4)."""
    lay, size = scene.layout, scene.size
    by_region: dict[str, list[int]] = {}
    for i in sorted(scene.visible):
        item = lay.items[i]
        if item.kind != "building" or not marks_a_cell(_single_mask(item.box, size), grid):
            continue
        cx, cy = (item.box[0] + item.box[2]) / 2, (item.box[1] + item.box[3]) / 2
        by_region.setdefault(region_of(cx, cy, size), []).append(i)
    if not by_region:
        return []
    names = sorted(by_region)
    group = by_region[names[int(rng.integers(len(names)))]]
    n = int(rng.integers(1, min(4, len(group)) + 1))
    return sorted(int(i) for i in rng.choice(group, size=n, replace=False))


def _add_buildings(
    rng: np.random.Generator, b: _Builder, lay: Layout, grid: int, before: set[int], after: set[int]
) -> list[int]:
    """New buildings (1-4) in one 3x3 region, on ground that is free in the before image."""
    size = lay.size
    regions = list(REGION_NAMES.values())
    order = [regions[int(i)] for i in rng.permutation(len(regions))]
    want = int(rng.integers(1, 5))
    allowed = (OTHERS, VEGETATION)
    for region in order[:4]:
        area = _cell_box(region, size)
        added: list[int] = []
        site = rng.random() < 0.5  # a cleared construction site around the new buildings
        hi = 27 if want == 1 else 21  # smaller buildings when several must fit in one region
        for _ in range(want * 8):
            if len(added) == want:
                break
            w, h = b.S(rng.integers(14, hi)), b.S(rng.integers(14, hi))
            x1, y1, x2, y2 = area
            # Centre inside the region; the box may reach past it.
            cx, cy = int(rng.integers(x1, x2)), int(rng.integers(y1, y2))
            box = (cx - w // 2, cy - h // 2, cx - w // 2 + w, cy - h // 2 + h)
            if box[0] < 1 or box[1] < 1 or box[2] > size - 1 or box[3] > size - 1:
                continue
            if not b.is_free(box, b.S(3)) or not b.is_on(box, allowed):
                continue
            if not marks_a_cell(_single_mask(box, size), grid):
                continue
            pad = b.S(3)
            site_box = (box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad)
            if site and min(site_box) >= 0 and max(site_box) <= size and b.is_on(site_box, allowed):
                patch = _Item(
                    "patch",
                    [("poly", _rect(box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad), _jitter(rng, SOIL), None)],
                    box,
                )
                b.items.append(patch)
                before.add(len(b.items) - 1)
                after.add(len(b.items) - 1)
            idx = b.add(b.building(box))
            after.add(idx)
            added.append(idx)
        if added:
            return added
    return []
