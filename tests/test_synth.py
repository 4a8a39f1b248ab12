"""Synthetic scenes and task samples: determinism, answer formats, unambiguous grounding, change pairs, speed,
and the real-sample adapters."""

from __future__ import annotations

import hashlib
import itertools

import numpy as np
import pytest

from rsedge.runtime.outputs import parse_boxes, parse_rle_mask
from rsedge.runtime.router import task_tag
from rsedge.synth.real import STRATA_ORDER, assign_splits, read_manifest, real_samples
from rsedge.synth.scenes import (
    LABEL_INDEX,
    OBJECT_CLASSES,
    SCENE_CLASSES,
    SceneObject,
    generate_scene,
    make_change_pair,
    mask_grid,
)
from rsedge.synth.tasks import (
    TASK_TAGS,
    TASKS,
    RefSpec,
    build_split,
    change_captions,
    iter_samples,
    make_sample,
    resolve_expression,
    split_digest,
    task_expert,
)

SIZE = 128


def _names(grid: np.ndarray, labels: list[str]) -> np.ndarray:
    return np.asarray(labels, dtype=object)[np.asarray(grid)]


def _check_answer(s) -> None:
    """The answer is in the task's format and decodes back to the ground truth in meta."""
    h, w = s.images[0].shape[:2]
    assert s.prompt.startswith(TASK_TAGS[s.task]) and "<image>" not in s.prompt
    assert task_tag(s.prompt) == TASK_TAGS[s.task]
    assert s.references and s.answer
    for im in s.images:
        assert im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3
    if s.task == "vg":
        boxes = parse_boxes(s.answer, w, h)
        assert len(boxes) == 1
        tol = (0.5 / 100 * w + 1e-6, 0.5 / 100 * h + 1e-6)
        got, want = boxes[0].to_list(), s.meta["box_px"]
        for i, (g, t) in enumerate(zip(got, want, strict=True)):
            assert abs(g - t) <= tol[i % 2], (s.answer, want)
    elif s.task == "ref":
        boxes = parse_boxes(s.prompt, w, h)
        assert len(boxes) == 1 and s.meta["class"] in s.answer
    elif s.task in ("seg", "cseg"):
        rle = parse_rle_mask(s.answer)
        assert rle is not None
        want = np.asarray(s.meta["grid"])
        assert rle.grid.shape == want.shape
        assert (_names(rle.grid, rle.labels) == _names(want, s.meta["labels"])).all()
    elif s.task == "vqa":
        assert s.answer in ("yes", "no") or s.answer.isdigit()
    elif s.task in ("cap", "ccd"):
        assert s.answer in s.references
        assert s.meta.get("real") or 3 <= len(s.references) <= 5
    elif s.task == "cls":
        assert s.answer in SCENE_CLASSES


@pytest.fixture(scope="module")
def per_task() -> dict[str, list]:
    rng = np.random.default_rng(1234)
    return {t: [make_sample(t, rng, SIZE) for _ in range(12)] for t in TASKS}


def test_same_seed_same_split_bit_for_bit():
    a = build_split("test", 16, seed=7)
    b = build_split("test", 16, seed=7)
    assert [s.id for s in a] == [s.id for s in b]
    for x, y in zip(a, b, strict=True):
        assert (x.prompt, x.answer, x.references) == (y.prompt, y.answer, y.references)
        assert all(np.array_equal(p, q) for p, q in zip(x.images, y.images, strict=True))
    assert split_digest(a) == split_digest(b)
    assert split_digest(a) != split_digest(build_split("test", 16, seed=8))
    stream = [s.answer for s in itertools.islice(iter_samples("train", 3), 6)]
    assert stream == [s.answer for s in itertools.islice(iter_samples("train", 3), 6)]
    # Resuming a stream reproduces its tail.
    assert next(iter_samples("train", 3, start=5)).answer == stream[5]


def test_splits_are_disjoint():
    def hashes(samples) -> set[str]:
        return {hashlib.sha1(im.tobytes()).hexdigest() for s in samples for im in s.images}

    train, val, test = (hashes(build_split(sp, 12, seed=0)) for sp in ("train", "val", "test"))
    stream = hashes(itertools.islice(iter_samples("train", 0), 12))
    assert not (train & val) and not (train & test) and not (val & test)
    assert not (stream & test) and not (stream & val)


def test_split_quotas_follow_the_mix():
    samples = build_split("val", 20, seed=1, mix={"cls": 1, "vqa": 3})
    assert sorted(s.task for s in samples).count("vqa") == 15
    with pytest.raises(ValueError):
        build_split("val", 4, mix={"nope": 1.0})


def test_every_task_answer_round_trips(per_task):
    for task in TASKS:
        for s in per_task[task]:
            assert s.task == task
            _check_answer(s)


def test_vg_expressions_are_unambiguous(per_task):
    for s in per_task["vg"]:
        objects = [SceneObject(o["cls"], tuple(o["box"]), o["colour"], o["size"]) for o in s.meta["objects"]]
        spec = RefSpec(**s.meta["expression"])
        assert s.prompt == f"[VG] Where is {spec.text()}?"
        hits = resolve_expression(spec, objects, SIZE)
        assert hits == [s.meta["target"]]
        if spec.superlative:
            assert len(resolve_expression(RefSpec(spec.cls, spec.colour), objects, SIZE)) >= 2
        assert list(objects[hits[0]].box) == s.meta["box_px"]


def test_object_boxes_match_the_label_mask():
    rng = np.random.default_rng(5)
    for cls in SCENE_CLASSES:
        scene = generate_scene(rng, SIZE, cls)
        for o in scene.objects:
            x1, y1, x2, y2 = o.box
            inside = scene.mask[y1:y2, x1:x2] == LABEL_INDEX[o.cls]
            # Object pixels touch all four edges of the box: the box is tight.
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            assert (x2 - x1) >= 4 and (y2 - y1) >= 4
        assert {o.cls for o in scene.objects} <= set(OBJECT_CLASSES)


def test_change_pairs():
    rng = np.random.default_rng(9)
    scene = generate_scene(rng, SIZE, "residential")
    none = make_change_pair(rng, scene, kind="none")
    assert none.count == 0 and not none.mask.any() and none.region is None
    assert not mask_grid(none.mask).any()
    assert change_captions("none", 0, None)[0] == "there is no change"
    added = make_change_pair(rng, scene, kind="added")
    assert added.kind == "added" and added.count == len(added.boxes) >= 1
    assert added.mask.any() and mask_grid(added.mask).any()
    # The before image is the given place, minus nothing: the same objects as the scene.
    assert added.before.count("building") == scene.count("building")
    assert added.after.count("building") == scene.count("building") + added.count
    removed = make_change_pair(rng, scene, kind="removed")
    if removed.kind == "removed":
        assert removed.after.count("building") == scene.count("building") - removed.count


def test_change_samples_agree(per_task):
    for s in per_task["ccd"] + per_task["cseg"]:
        grid = np.asarray(s.meta["grid"])
        if s.meta["change"] == "none":
            assert not grid.any() and s.meta["count"] == 0
        else:
            assert grid.any() and s.meta["count"] >= 1
        if s.task == "ccd":
            assert s.references == change_captions(s.meta["change"], s.meta["count"], s.meta["region"])


def test_router_experts():
    assert {t: task_expert(t) for t in TASKS} == {
        "vg": 1,
        "ref": 1,
        "seg": 2,
        "vqa": 0,
        "cls": 0,
        "cap": 0,
        "ccd": 0,
        "cseg": 2,
    }


def test_mask_grid_uneven_sides():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 50)) < 0.5
    got = mask_grid(mask, 8)
    ys, xs = (np.arange(9) * 37) // 8, (np.arange(9) * 50) // 8
    want = np.array([[mask[ys[i] : ys[i + 1], xs[j] : xs[j + 1]].mean() >= 0.5 for j in range(8)] for i in range(8)])
    assert np.array_equal(got, want)


def test_real_samples_load_and_are_well_formed():
    train, test = real_samples("train"), real_samples("test")
    assert train and test
    assert {s.meta["source_id"] for s in train}.isdisjoint({s.meta["source_id"] for s in test})
    for s in train + test:
        _check_answer(s)
    assert {s.task for s in test} >= {"cls", "vg", "ccd", "cseg", "vqa"}
    # The stored split is the seeded draw.
    items = read_manifest()
    keys = {i["id"]: min(i["tasks"], key=STRATA_ORDER.index) for i in items}
    drawn = assign_splits({k: [i for i, v in keys.items() if v == k] for k in set(keys.values())})
    assert drawn == {i["id"]: i["split"] for i in items}
