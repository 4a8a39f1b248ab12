"""The built-in grounding-with-reasoning calibration set: deterministic, hashed, train split only, and its answers
are what a reasoning grounder writes (parse_reasoning reads them back onto the annotations)."""

from __future__ import annotations

import pytest

from rsedge.calibration import (
    RS_GROUNDING_REASONING,
    CalibrationSet,
    describe,
    resolve_calibration,
    rs_grounding_reasoning,
)
from rsedge.calibration.calibset import DATA_DIR, _real_test_files, prepare_image
from rsedge.calibration.reasoning_set import PROMPTS, RESIZE, _objects
from rsedge.runtime.reasoning import map_boxes, parse_reasoning, smart_resize

build = rs_grounding_reasoning.__wrapped__  # past the cache: each call builds the set anew


def test_it_builds_deterministically():
    a, b = build(), build()
    assert a.items == b.items and a.content_hash == b.content_hash
    assert len(a.items) == 24 and a.info["box_space"]["factor"] == RESIZE["factor"]
    other = build(seed=1)
    assert other.content_hash != a.content_hash  # another order
    assert sorted(i.source for i in other.items) == sorted(i.source for i in a.items)  # of the same candidates
    assert a.compute_hash() == a.content_hash
    assert resolve_calibration(RS_GROUNDING_REASONING).content_hash == a.content_hash


def test_every_object_comes_before_any_repeats():
    cs = build(size=40)
    objects = {i.source.split("/")[0] for i in cs.items}
    first = [i.source.split("/")[0] for i in cs.items[: len(objects)]]
    assert sorted(first) == sorted(objects) and len(objects) == len(_objects()) == 5
    assert cs.info["repeats"] == 40 - 24 and len({i.source for i in cs.items}) == 24


def test_prompts_ask_for_reasoning_and_answers_hold_the_annotated_box():
    cs = build()
    objects = {o.source: o for o in _objects()}
    styles = set()
    for item in cs.items:
        assert "<think>" in item.prompt and "<answer>" in item.prompt and "JSON" in item.prompt
        styles.add(next(k for k, t in PROMPTS.items() if item.prompt.startswith(t.split("{expr}")[0])))
        r = parse_reasoning(item.answer)
        assert r.well_formed and r.reasoning and len(r.boxes) == 1 and r.labels[0] is not None
        obj = objects[item.source.split("/")[0]]
        img = prepare_image(DATA_DIR / item.images[0])
        assert img.size == obj.size
        (mapped,) = map_boxes(r, smart_resize(img.height, img.width), (img.height, img.width))
        assert mapped == pytest.approx(obj.box, abs=1.0)  # integer pixels of the resized input, mapped back
        assert all(float(v).is_integer() for v in r.boxes[0])
    assert styles == set(PROMPTS)


def test_the_test_split_never_enters():
    test_paths, _ = _real_test_files()
    cs = build(size=40)
    assert not {(DATA_DIR / rel).resolve() for item in cs.items for rel in item.images} & test_paths


def test_saved_and_loaded_it_keeps_its_hash(tmp_path):
    cs = build()
    saved = cs.save(tmp_path / "set")
    loaded = CalibrationSet.load(tmp_path / "set")
    assert saved.content_hash == loaded.content_hash == cs.content_hash
    assert [i.answer for i in loaded.items] == [i.answer for i in cs.items]
    assert "vgr 24" in describe(loaded)
