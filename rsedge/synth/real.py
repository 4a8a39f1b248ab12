"""Real annotated remote-sensing samples as TaskSamples, for evaluation (and a little fine-tuning).

The items live in ``rsedge/data/real/`` (images, masks, ``manifest.jsonl``, ``LICENSES.md``). They were
selected from the project's curated ``rs-samples`` set by ``build_real_subset`` (run
``python -m rsedge.synth.real SRC_DIR``) wherever the labels fit RSUniVLM's tasks:

- AID scene classes that map onto the synthetic scene classes -> ``cls`` (``AID_CLASS_MAP``);
- DIOR / DOTA boxes of the only instance of a category -> ``vg`` ("[VG] Where is the windmill?");
- LEVIR-CC pairs with their 5 reference captions -> ``ccd``;
- LEVIR-CD pairs with building-change masks -> ``cseg``;
- RSIVQA yes/no questions on DOTA / iSAID images -> ``vqa`` (reworded into the synthetic template);
- iSAID vehicle masks -> ``seg`` when the class fills at least one grid cell.

The train/test split is by image, stratified by the item's rarest task, drawn once with
``REAL_SPLIT_SEED`` and stored in the manifest, so it never changes under a new numpy.
"""

from __future__ import annotations

import json
import shutil
import sys
from importlib.resources import files
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from rsedge.runtime.outputs import format_box, format_rle
from rsedge.synth.scenes import mask_grid
from rsedge.synth.tasks import CCD_PROMPT, CLS_PROMPT, CSEG_PROMPT, TaskSample, article, box_0_100

REAL_DIR = Path(str(files("rsedge") / "data" / "real"))
REAL_SPLIT_SEED = 20250611
MAX_SIDE = 512  # big DOTA / iSAID scenes are stored downscaled to this longest side
# An item is stratified by its rarest task, so that the few seg / vg items reach the test split too.
STRATA_ORDER = ("seg", "vg", "ccd", "cseg", "cls", "vqa")

# AID class -> synthetic scene class; AID classes not listed have no synthetic counterpart.
AID_CLASS_MAP: dict[str, str] = {
    "BareLand": "bareland",
    "DenseResidential": "residential",
    "MediumResidential": "residential",
    "SparseResidential": "residential",
    "Forest": "forest",
    "Industrial": "industrial",
    "StorageTanks": "industrial",
    "Meadow": "meadow",
    "Parking": "parking",
    "Port": "harbor",
    "River": "river",
}
# DIOR / DOTA category -> words used in prompts.
CATEGORY_WORDS: dict[str, str] = {
    "baseballfield": "baseball field",
    "windmill": "windmill",
    "overpass": "overpass",
    "vehicle": "vehicle",
    "roundabout": "roundabout",
    "swimming-pool": "swimming pool",
}
# RSIVQA (DOTA) category -> noun used in the synthetic presence template; small/large vehicle merge
# into "vehicle" (see _vqa_items for how their answers combine).
VQA_WORDS: dict[str, str] = {
    "plane": "aircraft",
    "ship": "ship",
    "storage tank": "storage tank",
    "small vehicle": "vehicle",
    "large vehicle": "vehicle",
    "harbor": "harbor",
    "helicopter": "helicopter",
    "baseball diamond": "baseball diamond",
    "tennis court": "tennis court",
    "roundabout": "roundabout",
    "swimming pool": "swimming pool",
}
SYNTH_VOCABULARY = frozenset({"aircraft", "ship", "storage tank", "vehicle", "building", "road", "water"})
ISAID_VEHICLES = ("Large_Vehicle", "Small_Vehicle")
_PROVENANCE = (
    "dataset",
    "source_repo",
    "source_path",
    "source_commit",
    "license_note",
    "annotation_repo",
    "annotation_path",
    "annotation_join",
    "annotation_license",
    "qa_repo",
    "qa_path",
    "qa_join",
    "qa_license",
    "qa_caveat",
    "image_note",
    "label_source",
    "mask_note",
    "expression_type",
)


# ------------------------------------------------------------------------------------------------ loading


def _load_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _load_mask(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im, dtype=np.uint8).copy()


def read_manifest(root: Path = REAL_DIR) -> list[dict]:
    with open(root / "manifest.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _grid_meta(cells: np.ndarray, label: str, grid: int) -> dict:
    return {"label": label, "labels": ["others", label], "grid": cells.astype(np.uint8).tolist(), "grid_size": grid}


def item_samples(item: dict, root: Path = REAL_DIR, grid: int = 8) -> list[TaskSample]:
    """Every TaskSample one manifest item yields."""
    images = [_load_rgb(root / f) for f in item["files"]]
    base = {"source_id": item["id"], "dataset": item.get("dataset"), "split": item["split"], "real": True}
    out: list[TaskSample] = []
    sid = f"real-{item['id']}"
    if "cls" in item["tasks"]:
        meta = {**base, "class": item["class"], "source_class": item["source_class"]}
        out.append(TaskSample(f"{sid}-cls", "cls", images, CLS_PROMPT, item["class"], [item["class"]], meta))
    for k, g in enumerate(item.get("grounding", [])):
        h, w = images[0].shape[:2]
        box = box_0_100(g["box"], w, h)
        meta = {**base, "box": box, "box_px": g["box"], "class": g["category"], "in_vocabulary": g["in_vocabulary"]}
        prompt = f"[VG] Where is the {g['expression']}?"
        ans = format_box(box)
        out.append(TaskSample(f"{sid}-vg{k}", "vg", images, prompt, ans, [ans], meta))
    if "ccd" in item["tasks"]:
        refs = list(item["captions"])
        out.append(TaskSample(f"{sid}-ccd", "ccd", images, CCD_PROMPT, refs[0], refs, dict(base)))
    if "cseg" in item["tasks"]:
        cells = mask_grid(_load_mask(root / item["mask"]) > 0, grid)
        ans = format_rle(cells.astype(np.uint8), ["others", "building"])
        meta = {**base, **_grid_meta(cells, "building", grid)}
        out.append(TaskSample(f"{sid}-cseg", "cseg", images, CSEG_PROMPT, ans, [ans], meta))
    for k, qa in enumerate(item.get("qa", [])):
        meta = {**base, "kind": "presence", "class": qa["class"], "source_question": qa["source_question"]}
        meta["in_vocabulary"] = qa["class"] in SYNTH_VOCABULARY
        out.append(TaskSample(f"{sid}-vqa{k}", "vqa", list(images), qa["prompt"], qa["answer"], [qa["answer"]], meta))
    for k, seg in enumerate(item.get("seg", [])):
        values = [int(v) for v in seg["values"]]
        cells = mask_grid(np.isin(_load_mask(root / item["mask"]), values), grid)
        ans = format_rle(cells.astype(np.uint8), ["others", seg["label"]])
        meta = {**base, "class": seg["label"], **_grid_meta(cells, seg["label"], grid)}
        out.append(TaskSample(f"{sid}-seg{k}", "seg", images, f"[SEG] {seg['label']}.", ans, [ans], meta))
    return out


def real_samples(split: Literal["train", "test"], grid: int = 8, root: Path = REAL_DIR) -> list[TaskSample]:
    """All TaskSamples of the real items in ``split`` (images at their stored size, RGB uint8)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return [s for item in read_manifest(root) if item["split"] == split for s in item_samples(item, root, grid)]


# ----------------------------------------------------------------------------------------------- building


def assign_splits(groups: dict[str, list[str]], seed: int = REAL_SPLIT_SEED) -> dict[str, str]:
    """id -> "train"/"test": per group (sorted names, sorted ids) a seeded third goes to test."""
    rng = np.random.default_rng(seed)
    out: dict[str, str] = {}
    for name in sorted(groups):
        ids = sorted(groups[name])
        n_test = round(len(ids) / 3) if len(ids) >= 2 else 0
        test = {ids[int(i)] for i in rng.permutation(len(ids))[:n_test]}
        out.update({i: "test" if i in test else "train" for i in ids})
    return out


def _vqa_items(qa: list[dict]) -> list[dict]:
    """RSIVQA yes/no pairs in the synthetic wording; vehicle = small or large vehicle."""
    answers: dict[str, list[tuple[str, str]]] = {}
    for pair in qa:
        q = pair["question"].strip().lower()
        prefix = "does this picture contain "
        if not q.startswith(prefix) or pair["answer"] not in ("yes", "no"):
            continue  # counts are unreliable (README caveat); keep yes/no only
        name = q[len(prefix) :].rstrip("?").strip()
        if name in VQA_WORDS:
            answers.setdefault(VQA_WORDS[name], []).append((pair["answer"], pair["question"]))
    out = []
    for noun in sorted(answers):
        got = answers[noun]
        yes = any(a == "yes" for a, _ in got)
        # "no" for a merged noun needs every merged source to say no (both vehicle kinds asked).
        if not yes and noun == "vehicle" and len(got) < 2:
            continue
        out.append(
            {
                "class": noun,
                "prompt": f"[VQA] Is there {article(noun)} {noun} in the image?",
                "answer": "yes" if yes else "no",
                "source_question": " / ".join(q for _, q in got),
            }
        )
    return out


def _save_scaled(src: Path, dst: Path, mask: bool = False) -> tuple[float, list[int], list[int]]:
    """Copy, or downscale to MAX_SIDE (JPEG q=92 for photos, nearest PNG for masks); returns the factor."""
    with Image.open(src) as im:
        w, h = im.size
        f = min(1.0, MAX_SIDE / max(w, h))
        if f == 1.0:
            shutil.copyfile(src, dst)
            return 1.0, [w, h], [w, h]
        size = (round(w * f), round(h * f))
        if mask:
            im.resize(size, Image.NEAREST).save(dst)
        else:
            im.convert("RGB").resize(size, Image.LANCZOS).save(dst, quality=92)
        return f, [w, h], list(size)


def build_real_subset(src: Path, dst: Path = REAL_DIR, grid: int = 8) -> list[dict]:
    """Select, copy and annotate the usable real items from an ``rs-samples`` folder into ``dst``."""
    src, dst = Path(src), Path(dst)
    rows = read_manifest(src)
    items: list[dict] = []
    for r in rows:
        if r.get("split") not in (None, "main"):
            continue
        item: dict = {"id": r["id"], "tasks": []}
        sub = ""
        if r["task"] == "classification" and r.get("class") in AID_CLASS_MAP:
            item.update(tasks=["cls"], **{"class": AID_CLASS_MAP[r["class"]], "source_class": r["class"]})
            sub = "cls"
        elif r["id"].startswith("dior_") and r.get("objects"):
            item["grounding"] = _unique_boxes(r["objects"], 1.0)
            if item["grounding"]:
                item["tasks"], sub = ["vg"], "vg"
        elif r.get("subtask") == "change_captioning":
            item.update(tasks=["ccd"], captions=list(r["captions"]))
            sub = "ccd"
        elif r["task"] == "change" and r["id"].startswith("levircd_"):
            item["tasks"], sub = ["cseg"], "cseg"
        elif r.get("qa") and (r["id"].startswith("dota_") or r["id"].startswith("isaid_")):
            item["tasks"], sub = ["vqa"], "vqa"
        if not item["tasks"]:
            continue
        (dst / sub).mkdir(parents=True, exist_ok=True)
        names = []
        factor = 1.0
        for f in r["files"]:
            out_name = Path(f).name
            if sub == "vqa":
                out_name = Path(f).stem + ".jpg"
                factor, orig, saved = _save_scaled(src / f, dst / sub / out_name)
                item.update(original_size=orig, image_size=saved, resize_factor=round(factor, 6))
            else:
                shutil.copyfile(src / f, dst / sub / out_name)
            names.append(f"{sub}/{out_name}")
        item["files"] = names
        if "mask" in r and sub in ("cseg", "vqa"):
            mask_name = Path(r["mask"]).name
            _save_scaled(src / r["mask"], dst / sub / mask_name, mask=True)
            item["mask"] = f"{sub}/{mask_name}"
        if sub == "vqa":
            item["qa"] = _vqa_items(r["qa"])
            if r.get("objects"):
                item["grounding"] = _unique_boxes(r["objects"], factor)
                if item["grounding"]:
                    item["tasks"].append("vg")
            if "mask" in r:
                item["mask_values"] = r["mask_values"]
                values = [int(k) for k, v in r["mask_values"].items() if v in ISAID_VEHICLES]
                cells = mask_grid(np.isin(_load_mask(dst / item["mask"]), values), grid)
                if values and cells.any():
                    item["seg"] = [{"label": "vehicle", "values": values, "source_labels": list(ISAID_VEHICLES)}]
                    item["tasks"].append("seg")
                else:
                    (dst / item.pop("mask")).unlink()
                    item.pop("mask_values")
        for key in _PROVENANCE:
            if key in r:
                item[key] = r[key]
        items.append(item)
    keys = {i["id"]: min(i["tasks"], key=STRATA_ORDER.index) for i in items}
    splits = assign_splits({k: [i for i, v in keys.items() if v == k] for k in set(keys.values())})
    for item in items:
        item["split"] = splits[item["id"]]
    with open(dst / "manifest.jsonl", "w", encoding="utf-8") as fh:
        for item in items:
            fh.write(json.dumps(item, ensure_ascii=False) + "\n")
    return items


def _unique_boxes(objects: list[dict], factor: float) -> list[dict]:
    """Category-level grounding: boxes of categories with exactly one instance in the image."""
    counts: dict[str, int] = {}
    for o in objects:
        counts[o["class"]] = counts.get(o["class"], 0) + 1
    out = []
    for o in objects:
        if counts[o["class"]] == 1 and o["class"] in CATEGORY_WORDS:
            box = [round(v * factor, 2) for v in o["box"]]
            words = CATEGORY_WORDS[o["class"]]
            out.append({"category": o["class"], "expression": words, "box": box, "in_vocabulary": words == "vehicle"})
    return out


if __name__ == "__main__":
    built = build_real_subset(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else REAL_DIR)
    print(f"{len(built)} items written")
