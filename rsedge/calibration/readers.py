"""Readers for local copies of standard remote-sensing datasets, as RSUniVLM-format calibration items.

Point a reader at a dataset's root folder as it is distributed; ``detect_format`` recognises the layout and
``FORMATS`` maps a format name to its reader (detection tries them in the order listed here, most specific
first). Every item is one prompt with its task tag; answers use the model's output formats where the
dataset has labels (``format_box`` 0-100 boxes, ``format_rle`` run-length text on an 8 x 8 grid, free text).

- ``dior-rsvg`` (DIOR-RSVG, ZhanYang-nwpu/RSVG-pytorch ``data_loader.py``): ``Annotations/*.xml``, VOC style,
  one ``<object>`` per referring expression with ``<name>``, ``<bndbox>`` (xmin, ymin, xmax, ymax pixels) and
  ``<description>``; images ``JPEGImages/<filename>``. Optional ``test.txt`` lists object indices counted over
  the XML files in name order. -> [VG] "Where is the <expression>?" -> box, and [REF] box -> expression.
- ``rsvqa`` (RSVQA-LR / -HR, Lobry et al.; syvlo/RSVQA ``VQALoader.py`` and ``DataSpecification.md``):
  ``<prefix>_split_<split>_{questions,answers,images}.json``, each ``{"questions"|"answers"|"images": [...]}``
  with ``id`` and ``active``; an image lists ``questions_ids``, a question its ``question`` and
  ``answers_ids``, an answer its ``answer``; images ``<id>.tif`` in ``Images_LR/`` (LR) or ``Data/`` (HR).
  -> [VQA] question -> answer.
- ``levir-cc`` (LEVIR-CC, Chen-Yang-Liu/RSICC README and ``utils.py``): ``LevirCCcaptions.json``
  ``{"images": [{"filepath", "filename", "split", "sentences": [{"raw"}], "changeflag"}]}`` and
  ``images/<split>/{A,B}/<filename>``. -> [CCD] pair -> first sentence.
- ``karpathy-captions`` (UCM-Captions, RSICD, Sydney-Captions; torchrs ``rsicd.py``): ``dataset*.json``
  ``{"images": [{"filename", "split", "sentences": [{"raw"}]}]}``, images in ``RSICD_images/``,
  ``images/``, ``imgs/`` or beside the JSON. -> [CAP] -> first sentence.
- ``levir-cd`` (LEVIR-CD, torchrs ``levircd.py``, ChangeFormer): ``A/``, ``B/``, ``label/`` with the same file
  names, at the root or in split folders (``train/``, ``val/``, ``test/``). -> change [SEG] pair ->
  run-length text of the changed-building cells.
- ``loveda`` (LoveDA, Wang et al. 2021): ``<Split>/<Domain>/images_png`` beside ``masks_png`` (any letter
  case), masks hold class indices (``LOVEDA_CLASSES``; 0 no-data and 1 background count as "others").
  -> one [SEG] "<class>." per class that fills at least one grid cell.
- ``class-folders`` (AID, UCMerced_LandUse ``Images/``, NWPU-RESISC45): a folder per class. -> [CLS] -> class
  name in words ("DenseResidential", "denseresidential", "dense_residential" -> "dense residential").
- ``plain``: any folder of images, unlabelled. Image i (sorted by relative path) gets one prompt per expert,
  entry ``i % 4`` of each row of ``ROTATION``, so every expert sees every image and every task tag recurs
  every 4 images ([CCD] takes the image as both "before" and "after").

Splits named "test" are skipped wherever a layout marks them: a calibration set should not contain what a
quantized model is later evaluated on. Text answers are whitespace-normalised with the trailing full stop
dropped, as in the captions the model was trained on.

Runtime module: numpy, Pillow and the stdlib only.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np

from rsedge.errors import ImageError, RsedgeError
from rsedge.runtime.images import opened_image
from rsedge.runtime.outputs import format_box, format_rle
from rsedge.runtime.router import task_tag
from rsedge.synth.scenes import mask_grid
from rsedge.synth.tasks import CAP_PROMPT, CCD_PROMPT, CLS_PROMPT, CSEG_PROMPT, TASK_TAGS, TASKS, box_0_100

GRID = 8  # the [SEG] answer grid RSUniVLM is trained on
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})
SKIPPED_SPLITS = frozenset({"test"})
# LoveDA mask index -> class word; 0 (no-data) and 1 (background) are left out, i.e. "others".
LOVEDA_CLASSES: dict[int, str] = {2: "building", 3: "road", 4: "water", 5: "barren", 6: "forest", 7: "agriculture"}
# UCMerced folder names run words together; everything else splits on case changes, "_" and "-".
CLASS_WORDS: dict[str, str] = {
    "baseballdiamond": "baseball diamond",
    "denseresidential": "dense residential",
    "golfcourse": "golf course",
    "mediumresidential": "medium residential",
    "mobilehomepark": "mobile home park",
    "parkinglot": "parking lot",
    "sparseresidential": "sparse residential",
    "storagetanks": "storage tanks",
    "tenniscourt": "tennis court",
}
# Unlabelled prompts for plain image folders: one row per expert (0 default, 1 [VG]/[REF], 2 [SEG]).
ROTATION: tuple[tuple[tuple[str, str], ...], ...] = (
    (
        ("cap", CAP_PROMPT),
        ("vqa", "[VQA] Is there a building in the image?"),
        ("cls", CLS_PROMPT),
        ("ccd", CCD_PROMPT),
    ),
    (
        ("vg", "[VG] Where is the building?"),
        ("ref", "[REF] what is [25, 25, 75, 75]?"),
        ("vg", "[VG] Where is the vehicle?"),
        ("ref", "[REF] what is [0, 0, 50, 50]?"),
    ),
    (
        ("seg", "[SEG] building."),
        ("seg", "[SEG] road."),
        ("seg", "[SEG] water."),
        ("seg", "[SEG] vegetation."),
    ),
)


# Tasks of other families' sets, whose prompts carry no RSUniVLM tag: grounding with reasoning
# (rsedge.calibration.reasoning_set).
UNTAGGED_TASKS: tuple[str, ...] = ("vgr",)


class CalibrationError(RsedgeError):
    """A calibration source cannot be read, or a calibration set is incomplete or fails its hash check."""


@dataclass
class CalibItem:
    """One calibration prompt: its images (files on disk), tagged prompt, answer (None: unlabelled), task, origin.

    ``task`` is one of ``rsedge.synth.tasks.TASKS`` ("cseg" is the change [SEG] on an image pair) or of
    ``UNTAGGED_TASKS``;
    ``source`` names the dataset item, relative to the dataset root, e.g. "dior-rsvg:Annotations/00001.xml#0".
    """

    images: list[Path]
    prompt: str
    answer: str | None
    task: str
    source: str

    def __post_init__(self) -> None:
        # Readers are the only producers; a mismatch here is a reader bug, caught before it reaches a set.
        if self.task not in TASKS and self.task not in UNTAGGED_TASKS:
            raise ValueError(f"unknown task {self.task!r}; known: {', '.join(TASKS + UNTAGGED_TASKS)}")
        tag = TASK_TAGS.get(self.task)
        if task_tag(self.prompt) != tag:
            need = f"start with the {tag} tag" if tag else "carry no task tag"
            raise ValueError(f"prompt {self.prompt!r} does not {need}")
        if not self.images:
            raise ValueError("a calibration item needs at least one image")


@dataclass(frozen=True)
class Record:
    """One unit of a dataset (an annotation file, an image, an image pair) whose items are read on demand.

    Listing records is cheap; ``expand`` may open masks, so the set builder expands only the records it needs.
    """

    key: str
    expand: Callable[[], list[CalibItem]]


@dataclass(frozen=True)
class DatasetFormat:
    """A dataset layout: how to recognise it, which tasks it yields, and how to list its records."""

    name: str
    description: str
    tasks: tuple[str, ...]
    labelled: bool
    detect: Callable[[Path], bool]
    records: Callable[[Path], list[Record]]

    def read(self, root: Path) -> Iterator[CalibItem]:
        """Every item of the dataset at ``root``, record by record."""
        for record in self.records(Path(root)):
            yield from record.expand()


FORMATS: dict[str, DatasetFormat] = {}


def register(
    name: str, *, description: str, tasks: tuple[str, ...], detect: Callable[[Path], bool], labelled: bool = True
) -> Callable[[Callable[[Path], list[Record]]], Callable[[Path], list[Record]]]:
    """Add a reader to FORMATS; registration order is detection order."""

    def wrap(records: Callable[[Path], list[Record]]) -> Callable[[Path], list[Record]]:
        if name in FORMATS:
            raise ValueError(f"dataset format {name!r} is registered twice")

        def guarded(root: Path) -> list[Record]:
            # A field missing or of the wrong type in a dataset's JSON/XML is the user's data, not a bug here:
            # report it as one line naming the source.
            try:
                return records(root)
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise CalibrationError(f"{root}: malformed {name} data ({type(e).__name__}: {e})") from None

        FORMATS[name] = DatasetFormat(name, description, tasks, labelled, detect, guarded)
        return records

    return wrap


def detect_format(path: str | Path) -> str:
    """Name of the first registered format whose layout ``path`` has."""
    path = Path(path)
    if not path.is_dir():
        raise CalibrationError(f"calibration source {path} is not a folder")
    for name, fmt in FORMATS.items():
        if fmt.detect(path):
            return name
    raise CalibrationError(f"{path}: no known dataset layout and no images; known formats: {', '.join(FORMATS)}")


def parse_source(text: str | Path) -> tuple[Path, str | None]:
    """``FORMAT=PATH`` forces a format (when detection would guess wrong); anything else is a path."""
    if isinstance(text, Path):
        return text, None
    name, sep, rest = text.partition("=")
    if sep and name in FORMATS:
        return Path(rest), name
    return Path(text), None


def read_source(path: str | Path, fmt: str | None = None) -> Iterator[CalibItem]:
    """Items of the dataset at ``path``, in the layout ``fmt`` (detected when None)."""
    path = Path(path)
    name = fmt or detect_format(path)
    if name not in FORMATS:
        raise CalibrationError(f"unknown dataset format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name].read(path)


# ------------------------------------------------------------------------------------------------ helpers


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p)) if folder.is_dir() else []


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []


def _child(folder: Path, name: str) -> Path | None:
    """The child folder called ``name`` in any letter case (LoveDA copies differ: images_png / Images_png)."""
    for p in _subdirs(folder):
        if p.name.lower() == name.lower():
            return p
    return None


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise CalibrationError(f"cannot read {path}: {e}") from None


def _sentence(text: str) -> str:
    """Caption text as the model writes it: single spaces, no trailing full stop (RSICD writes " .")."""
    return re.sub(r"\s*\.$", "", " ".join(str(text).split()))


def _phrase(text: str) -> str:
    """A description as a noun phrase: sentence case lowered ("A green field" -> "a green field"), acronyms kept."""
    s = _sentence(text)
    if s[:1].isupper() and not s[1:2].isupper():
        s = s[0].lower() + s[1:]
    return s


def _referent(text: str) -> str:
    """The definite form for a [VG] question: "A green field" -> "the green field", "vehicle" -> "the vehicle"."""
    s = _phrase(text)
    first, _, rest = s.partition(" ")
    if first in ("a", "an") and rest:
        return "the " + rest
    if first in ("the", "this", "that", "these", "those"):
        return s
    return "the " + s


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with opened_image(path) as im:  # reads the header only; a bomb is refused, not decoded
            return im.size
    except ImageError as e:
        raise CalibrationError(str(e)) from None


def _mask_array(path: Path) -> np.ndarray:
    """A single-band mask as an integer array (class indices, or 0/255 for binary masks)."""
    try:
        with opened_image(path) as im:  # the runtime's pixel cap, checked before decoding
            if im.mode in ("RGB", "RGBA"):  # some LEVIR-CD copies store labels as grey RGB
                im = im.convert("L")
            return np.asarray(im).astype(np.int64)
    except ImageError as e:
        raise CalibrationError(f"mask {e}") from None
    except OSError as e:
        raise CalibrationError(f"cannot read mask {path}: {e}") from None


def _rle(mask: np.ndarray, label: str) -> str:
    cells = mask_grid(mask, GRID)
    return format_rle(cells.astype(np.uint8), ["others", label])


def _split_of(rel: Path) -> str | None:
    """The split a path lies in, when one of its folders names one."""
    for part in rel.parts:
        if part.lower() in ("train", "val", "test"):
            return part.lower()
    return None


# -------------------------------------------------------------------------------------------- DIOR-RSVG


def _dior_detect(root: Path) -> bool:
    ann = root / "Annotations"
    if not (ann.is_dir() and (root / "JPEGImages").is_dir()):
        return False
    first = next(iter(sorted(ann.glob("*.xml"))), None)
    if first is None:
        return False
    try:
        tree = ET.parse(first).getroot()
    except OSError:
        return False
    except ET.ParseError as e:  # the DIOR layout with a broken annotation: not a plain image folder
        raise CalibrationError(f"cannot read {first}: malformed XML ({e})") from None
    # Plain DIOR detection annotations share the layout but carry no referring expressions.
    return any(obj.find("description") is not None for obj in tree.iter("object"))


def _index_file(path: Path) -> set[int]:
    if not path.is_file():
        return set()
    return {int(line) for line in path.read_text(encoding="utf-8").split() if line.strip().isdigit()}


def _dior_items(
    image: Path, size: tuple[int, int] | None, objects: list[tuple[int, list[float], str]], source: str
) -> list[CalibItem]:
    if not image.is_file():
        return []
    w, h = size or _image_size(image)
    out = []
    for index, box, description in objects:
        box_text = format_box(box_0_100(box, w, h))
        src = f"{source}#{index}"
        out.append(CalibItem([image], f"[VG] Where is {_referent(description)}?", box_text, "vg", src))
        out.append(CalibItem([image], f"[REF] what is {box_text}?", _phrase(description), "ref", src))
    return out


@register(
    "dior-rsvg",
    description="DIOR-RSVG: Annotations/*.xml (VOC with <description>) + JPEGImages/",
    tasks=("vg", "ref"),
    detect=_dior_detect,
)
def _dior_records(root: Path) -> list[Record]:
    # The RSVG split files index objects in annotation order; count over every object, even skipped ones.
    test = _index_file(root / "test.txt")
    records = []
    counter = 0
    for xml in sorted((root / "Annotations").glob("*.xml")):
        try:
            tree = ET.parse(xml).getroot()
        except (ET.ParseError, OSError) as e:
            raise CalibrationError(f"cannot read {xml}: {e}") from None
        size = None
        width, height = tree.findtext("size/width"), tree.findtext("size/height")
        if width and height and int(float(width)) > 0 and int(float(height)) > 0:
            size = (int(float(width)), int(float(height)))
        objects = []
        for obj in tree.iter("object"):
            index, counter = counter, counter + 1
            description = (obj.findtext("description") or "").strip()
            box = [obj.findtext(f"bndbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")]
            if index in test or not description or any(v is None for v in box):
                continue
            objects.append((index, [float(v) for v in box], description))
        if objects:
            name = (tree.findtext("filename") or f"{xml.stem}.jpg").strip()
            if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
                raise CalibrationError(f"{xml}: <filename> {name} points outside the dataset's JPEGImages folder")
            image = root / "JPEGImages" / name
            source = f"dior-rsvg:Annotations/{xml.name}"
            records.append(Record(xml.name, partial(_dior_items, image, size, objects, source)))
    return records


# ------------------------------------------------------------------------------------------------ RSVQA

_RSVQA_IMAGE_DIRS = ("Images_LR", "Images_HR", "Data", "Images", "images")


def _rsvqa_stems(root: Path) -> list[str]:
    stems = []
    for q in sorted(root.glob("*_questions.json")):
        stem = q.name[: -len("_questions.json")]
        if (root / f"{stem}_answers.json").is_file() and (root / f"{stem}_images.json").is_file():
            stems.append(stem)
    return stems


def _rsvqa_items(image: Path, questions: list[tuple[int, str, str]], source: str) -> list[CalibItem]:
    if not image.is_file():
        return []
    return [CalibItem([image], f"[VQA] {q}", a, "vqa", f"{source}:q{qid}") for qid, q, a in questions]


@register(
    "rsvqa",
    description="RSVQA-LR/HR: *_questions.json, *_answers.json, *_images.json + Images_LR/ or Data/ ({id}.tif)",
    tasks=("vqa",),
    detect=lambda root: bool(_rsvqa_stems(root)),
)
def _rsvqa_records(root: Path) -> list[Record]:
    records = []
    for stem in _rsvqa_stems(root):
        # "LR_split_test", "USGS_split_test_phili": the test sets are not for calibration.
        if SKIPPED_SPLITS & set(stem.lower().split("_")):
            continue
        by_id = {}
        for kind in ("questions", "answers", "images"):
            rows = _load_json(root / f"{stem}_{kind}.json").get(kind, [])
            by_id[kind] = {row["id"]: row for row in rows if row.get("active", True)}
        images = by_id["images"]
        first = next(iter(images), None)
        folders = [root / d for d in _RSVQA_IMAGE_DIRS] + [root]
        folder = next((d for d in folders if first is not None and (d / f"{first}.tif").is_file()), root)
        for img_id, row in images.items():
            qa = []
            for qid in row.get("questions_ids", []):
                q = by_id["questions"].get(qid)
                answer_ids = [a for a in (q or {}).get("answers_ids", []) if a in by_id["answers"]]
                if q is None or not answer_ids:
                    continue
                qa.append(
                    (qid, " ".join(q["question"].split()), str(by_id["answers"][answer_ids[0]]["answer"]).strip())
                )
            if qa:
                image = folder / f"{img_id}.tif"
                records.append(Record(f"{stem}:{img_id}", partial(_rsvqa_items, image, qa, f"rsvqa:{stem}")))
    return records


# --------------------------------------------------------------------------------------------- LEVIR-CC


def _pair_items(
    a: Path, b: Path, prompt: str, answer: str | Callable[[], str], task: str, source: str
) -> list[CalibItem]:
    """One item on an image pair (skipped when a file is missing); ``answer`` may be computed on demand."""
    if not (a.is_file() and b.is_file()):
        return []
    return [CalibItem([a, b], prompt, answer() if callable(answer) else answer, task, source)]


@register(
    "levir-cc",
    description="LEVIR-CC: LevirCCcaptions.json + images/{split}/A|B/",
    tasks=("ccd",),
    detect=lambda root: (root / "LevirCCcaptions.json").is_file(),
)
def _levircc_records(root: Path) -> list[Record]:
    records = []
    for row in _load_json(root / "LevirCCcaptions.json").get("images", []):
        split = str(row.get("split") or row.get("filepath") or "")
        sentences = [s.get("raw", "") for s in row.get("sentences", []) if s.get("raw", "").strip()]
        if split.lower() in SKIPPED_SPLITS or not sentences or "filename" not in row:
            continue
        folder = root / "images" / str(row.get("filepath") or split)
        name, key = row["filename"], f"{split}/{row['filename']}"
        a, b = folder / "A" / name, folder / "B" / name
        records.append(
            Record(key, partial(_pair_items, a, b, CCD_PROMPT, _sentence(sentences[0]), "ccd", f"levir-cc:{key}"))
        )
    return records


# ------------------------------------------------------------------------------------ Karpathy captions

_CAPTION_IMAGE_DIRS = ("RSICD_images", "images", "imgs", "Images")


def _karpathy_files(root: Path) -> list[Path]:
    out = []
    for path in sorted(root.glob("dataset*.json")):
        try:
            with open(path, encoding="utf-8") as fh:
                rows = json.load(fh).get("images")
        except (OSError, ValueError, AttributeError):
            continue
        if (
            isinstance(rows, list)
            and rows
            and isinstance(rows[0], dict)
            and {"filename", "sentences"} <= rows[0].keys()
        ):
            out.append(path)
    return out


def _single_items(image: Path, prompt: str, answer: str | None, task: str, source: str) -> list[CalibItem]:
    return [CalibItem([image], prompt, answer, task, source)] if image.is_file() else []


@register(
    "karpathy-captions",
    description="UCM-Captions / RSICD / Sydney-Captions: Karpathy-style dataset*.json + image folder",
    tasks=("cap",),
    detect=lambda root: bool(_karpathy_files(root)),
)
def _karpathy_records(root: Path) -> list[Record]:
    records = []
    for path in _karpathy_files(root):
        rows = _load_json(path)["images"]
        folders = [root / d for d in _CAPTION_IMAGE_DIRS] + [root]
        folder = next((d for d in folders if (d / rows[0]["filename"]).is_file()), root)
        for row in rows:
            sentences = [s.get("raw", "") for s in row.get("sentences", []) if s.get("raw", "").strip()]
            if str(row.get("split", "")).lower() in SKIPPED_SPLITS or not sentences:
                continue
            key = f"{path.name}:{row['filename']}"
            image = folder / row["filename"]
            records.append(Record(key, partial(_single_items, image, CAP_PROMPT, _sentence(sentences[0]), "cap", key)))
    return records


# --------------------------------------------------------------------------------------------- LEVIR-CD


def _has_abl(folder: Path) -> bool:
    return all((folder / d).is_dir() for d in ("A", "B", "label"))


def _levircd_roots(root: Path) -> list[Path]:
    return [root] if _has_abl(root) else [d for d in _subdirs(root) if _has_abl(d)]


def _change_mask_answer(label: Path) -> str:
    return _rle(_mask_array(label) > 0, "building")


@register(
    "levir-cd",
    description="LEVIR-CD: A/, B/, label/ (same file names), at the root or per split folder",
    tasks=("cseg",),
    detect=lambda root: bool(_levircd_roots(root)),
)
def _levircd_records(root: Path) -> list[Record]:
    records = []
    for folder in _levircd_roots(root):
        split = folder.name.lower() if folder != root else None
        if split in SKIPPED_SPLITS:
            continue
        for a in _images_in(folder / "A"):
            rel = a.relative_to(root).as_posix()
            b, label = folder / "B" / a.name, folder / "label" / a.name
            if not label.is_file():
                continue
            answer = partial(_change_mask_answer, label)
            records.append(Record(rel, partial(_pair_items, a, b, CSEG_PROMPT, answer, "cseg", f"levir-cd:{rel}")))
    return records


# ----------------------------------------------------------------------------------------------- LoveDA


def _loveda_dirs(root: Path) -> list[tuple[Path, Path]]:
    """(images_png, masks_png) folder pairs at the root or up to two levels below (Train/Urban/...)."""
    out = []
    level = [root]
    for _ in range(3):
        nxt = []
        for folder in level:
            images, masks = _child(folder, "images_png"), _child(folder, "masks_png")
            if images is not None and masks is not None:
                out.append((images, masks))
            nxt.extend(_subdirs(folder))
        level = nxt
    return out


def _loveda_items(image: Path, mask_path: Path, source: str) -> list[CalibItem]:
    mask = _mask_array(mask_path)
    out = []
    for index, name in LOVEDA_CLASSES.items():
        cells = mask_grid(mask == index, GRID)
        if cells.any():  # a class too small to fill a cell would get an all-"others" answer
            answer = format_rle(cells.astype(np.uint8), ["others", name])
            out.append(CalibItem([image], f"[SEG] {name}.", answer, "seg", f"{source}#{name}"))
    return out


@register(
    "loveda",
    description="LoveDA: <Split>/<Domain>/images_png + masks_png (class-index PNGs)",
    tasks=("seg",),
    detect=lambda root: bool(_loveda_dirs(root)),
)
def _loveda_records(root: Path) -> list[Record]:
    records = []
    for images, masks in _loveda_dirs(root):
        if _split_of(images.relative_to(root)) in SKIPPED_SPLITS:
            continue
        for image in _images_in(images):
            mask = masks / image.name
            if mask.is_file():
                rel = image.relative_to(root).as_posix()
                records.append(Record(rel, partial(_loveda_items, image, mask, f"loveda:{rel}")))
    return records


# ---------------------------------------------------------------------------------------- class folders


def class_words(folder_name: str) -> str:
    """A class folder name in words: "DenseResidential" / "dense_residential" / "denseresidential" alike."""
    key = folder_name.lower()
    if key in CLASS_WORDS:
        return CLASS_WORDS[key]
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", folder_name)
    return " ".join(re.split(r"[\s_\-]+", spaced)).lower().strip()


def _class_root(root: Path) -> Path | None:
    """The folder holding one subfolder of images per class: the root, or Images/ (UCMerced_LandUse)."""
    for folder in (root, root / "Images"):
        if not folder.is_dir() or _images_in(folder):
            continue
        if sum(1 for d in _subdirs(folder) if _images_in(d)) >= 2:
            return folder
    return None


@register(
    "class-folders",
    description="AID / UCMerced / NWPU-RESISC45: one folder of images per class",
    tasks=("cls",),
    detect=lambda root: _class_root(root) is not None,
)
def _class_records(root: Path) -> list[Record]:
    folder = _class_root(root)
    records = []
    for class_dir in _subdirs(folder) if folder is not None else []:
        words = class_words(class_dir.name)
        for image in _images_in(class_dir):
            rel = image.relative_to(root).as_posix()
            records.append(Record(rel, partial(_single_items, image, CLS_PROMPT, words, "cls", f"class-folders:{rel}")))
    return records


# ------------------------------------------------------------------------------------------------ plain


def rotation_items(image: Path, index: int, source: str) -> list[CalibItem]:
    """The unlabelled prompts of the ``index``-th image of a folder: ROTATION entry ``index % 4`` per expert."""
    out = []
    for row in ROTATION:
        task, prompt = row[index % len(row)]
        images = [image, image] if task == "ccd" else [image]  # "before" = "after": a no-change pair
        out.append(CalibItem(images, prompt, None, task, source))
    return out


def _plain_images(root: Path) -> list[Path]:
    return sorted(
        (p for p in root.rglob("*") if _is_image(p) and not any(s.startswith(".") for s in p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )


def _plain_detect(root: Path) -> bool:
    return any(_is_image(p) for p in root.rglob("*"))


@register(
    "plain",
    description="any folder of images (unlabelled; ROTATION gives each image one prompt per expert)",
    tasks=tuple(dict.fromkeys(task for row in ROTATION for task, _ in row)),
    detect=_plain_detect,
    labelled=False,
)
def _plain_records(root: Path) -> list[Record]:
    records = []
    for i, image in enumerate(_plain_images(root)):
        rel = image.relative_to(root).as_posix()
        records.append(Record(rel, partial(rotation_items, image, i, f"plain:{rel}")))
    return records
