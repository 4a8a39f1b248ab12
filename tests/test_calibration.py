"""Calibration readers on tiny fixtures in each dataset's real layout, balanced hashed sets, and rs-default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rsedge.calibration import (
    FORMATS,
    ROTATION,
    CalibrationError,
    CalibrationSet,
    build_calibration_set,
    calibrate_build_command,
    detect_format,
    read_source,
    resolve_calibration,
    rs_default,
)
from rsedge.calibration.calibset import MAX_SIDE, expert_of, pixel_digest, prepare_image
from rsedge.errors import OptionError, RsedgeError
from rsedge.runtime.outputs import parse_rle_mask
from rsedge.synth.real import REAL_DIR, read_manifest
from rsedge.synth.tasks import CCD_PROMPT, CLS_PROMPT, CSEG_PROMPT

# Row-wise run-length text of an 8 x 8 grid whose top-left 2 x 2 cells hold ``label``.
TOP_LEFT_2X2 = "\n".join(["building*2, others*6"] * 2 + ["others*8"] * 6)


def _image(path: Path, size: tuple[int, int] = (64, 64), colour: tuple[int, int, int] = (90, 120, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _mask(path: Path, grid: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.astype(np.uint8), mode="L").save(path)
    return path


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def _voc(filename: str, size: tuple[int, int], objects: list[tuple[str, tuple[int, int, int, int], str]]) -> str:
    """A DIOR-RSVG annotation, laid out as RSVG-pytorch's RSVGD/Annotations/00001.xml."""
    objs = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox><description>{desc}</description></object>"
        for name, b, desc in objects
    )
    return (
        '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n<annotation>'
        f"<filename>{filename}</filename><source><database>DIOR</database></source>"
        f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
        f"<segmented>0</segmented>{objs}</annotation>"
    )


@pytest.fixture
def dior(tmp_path: Path) -> Path:
    root = tmp_path / "DIOR_RSVG"
    (root / "Annotations").mkdir(parents=True)
    _image(root / "JPEGImages" / "00001.jpg", (200, 100))
    _image(root / "JPEGImages" / "00002.jpg", (80, 80), (10, 20, 30))
    objs1 = [("golffield", (20, 10, 120, 60), "A green and brown golf field")]
    (root / "Annotations" / "00001.xml").write_text(_voc("00001.jpg", (200, 100), objs1))
    objs2 = [
        ("vehicle", (8, 8, 16, 24), "The vehicle on the left"),
        ("storagetank", (40, 40, 80, 80), "a white storage tank."),
    ]
    (root / "Annotations" / "00002.xml").write_text(_voc("00002.jpg", (80, 80), objs2))
    (root / "test.txt").write_text("2\n")  # object 2 (the storage tank) is in the RSVG test split
    return root


@pytest.fixture
def rsvqa(tmp_path: Path) -> Path:
    root = tmp_path / "RSVQA_LR"
    _image(root / "Images_LR" / "0.tif")
    _image(root / "Images_LR" / "1.tif")
    images = [
        {"id": 0, "original_name": "t_0.tif", "questions_ids": [0, 1, 2], "active": True},
        {"id": 1, "original_name": "t_1.tif", "questions_ids": [3], "active": False},
    ]
    questions = [
        {"id": 0, "img_id": 0, "type": "presence", "question": "Is there a road?", "answers_ids": [0], "active": True},
        {"id": 1, "img_id": 0, "type": "count", "question": "How many  buildings are there?", "answers_ids": [1],
         "active": True},
        {"id": 2, "img_id": 0, "type": "comp", "question": "Is it gone?", "answers_ids": [2], "active": False},
        {"id": 3, "img_id": 1, "type": "rural_urban", "question": "Is it urban?", "answers_ids": [3], "active": True},
    ]  # fmt: skip
    answers = [{"id": i, "question_id": i, "answer": a, "active": True} for i, a in enumerate(["yes", "12", "no", "x"])]
    for split in ("train", "test"):
        _write_json(root / f"LR_split_{split}_images.json", {"images": images})
        _write_json(root / f"LR_split_{split}_questions.json", {"questions": questions})
        _write_json(root / f"LR_split_{split}_answers.json", {"answers": answers})
    return root


@pytest.fixture
def levircc(tmp_path: Path) -> Path:
    root = tmp_path / "Levir-CC-dataset"
    rows = []
    for k, split in enumerate(("train", "test")):
        name = f"{split}_000001.png"
        _image(root / "images" / split / "A" / name)
        _image(root / "images" / split / "B" / name, colour=(200, 200, 200))
        sentences = [{"tokens": ["x"], "raw": f" many houses are built along the road {k} .", "imgid": k, "sentid": 0}]
        rows.append({"filepath": split, "filename": name, "imgid": k, "split": split, "sentences": sentences,
                     "changeflag": 1, "sentids": [0]})  # fmt: skip
    _write_json(root / "LevirCCcaptions.json", {"images": rows})
    return root


@pytest.fixture
def rsicd(tmp_path: Path) -> Path:
    root = tmp_path / "RSICD"
    _image(root / "RSICD_images" / "airport_1.jpg")
    _image(root / "RSICD_images" / "beach_2.jpg")
    rows = [
        {"filename": "airport_1.jpg", "imgid": 0, "split": "train", "sentids": [0, 1],
         "sentences": [{"raw": "Many planes are parked next to a long building in an airport .", "tokens": []},
                       {"raw": "second caption", "tokens": []}]},
        {"filename": "beach_2.jpg", "imgid": 1, "split": "test", "sentids": [2],
         "sentences": [{"raw": "a beach", "tokens": []}]},
    ]  # fmt: skip
    _write_json(root / "dataset_rsicd.json", {"images": rows, "dataset": "rsicd"})
    return root


@pytest.fixture
def levircd(tmp_path: Path) -> Path:
    root = tmp_path / "LEVIR-CD"
    label = np.zeros((64, 64), np.uint8)
    label[:16, :16] = 255  # the top-left 2 x 2 cells of the 8 x 8 grid changed
    for split in ("train", "test"):
        _image(root / split / "A" / f"{split}_1.png")
        _image(root / split / "B" / f"{split}_1.png", colour=(1, 2, 3))
        _mask(root / split / "label" / f"{split}_1.png", label)
    return root


@pytest.fixture
def aid(tmp_path: Path) -> Path:
    root = tmp_path / "AID"
    _image(root / "Airport" / "airport_1.jpg")
    _image(root / "DenseResidential" / "denseresidential_1.jpg")
    return root


@pytest.fixture
def loveda(tmp_path: Path) -> Path:
    root = tmp_path / "LoveDA"
    mask = np.ones((64, 64), np.uint8)  # 1 = background
    mask[:16, :16] = 2  # building: 2 x 2 cells
    mask[56:, :] = 4  # water: the bottom row of cells
    mask[30, 30:33] = 3  # road: 3 pixels, no cell
    mask[0, 63] = 0  # no-data
    _image(root / "Train" / "Urban" / "images_png" / "0.png")
    _mask(root / "Train" / "Urban" / "masks_png" / "0.png", mask)
    _image(root / "Test" / "Urban" / "images_png" / "9.png")  # the test split has no masks
    return root


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    root = tmp_path / "plain"
    _image(root / "a.png")
    _image(root / "b.jpg")
    _image(root / "sub" / "c.png")
    _image(root / "sub" / "d.tif", (700, 350))
    (root / "notes.txt").write_text("not an image")
    return root


def _items(root: Path, fmt: str | None = None) -> list[tuple[list[str], str, str | None, str]]:
    return [
        ([p.relative_to(root).as_posix() for p in i.images], i.prompt, i.answer, i.task) for i in read_source(root, fmt)
    ]


def test_dior_rsvg_reader(dior: Path) -> None:
    assert detect_format(dior) == "dior-rsvg"
    assert _items(dior) == [
        (["JPEGImages/00001.jpg"], "[VG] Where is the green and brown golf field?", "[10, 10, 60, 60]", "vg"),
        (["JPEGImages/00001.jpg"], "[REF] what is [10, 10, 60, 60]?", "a green and brown golf field", "ref"),
        (["JPEGImages/00002.jpg"], "[VG] Where is the vehicle on the left?", "[10, 10, 20, 30]", "vg"),
        (["JPEGImages/00002.jpg"], "[REF] what is [10, 10, 20, 30]?", "the vehicle on the left", "ref"),
    ]


def test_rsvqa_reader(rsvqa: Path) -> None:
    assert detect_format(rsvqa) == "rsvqa"
    # Train split only; inactive image 1 and inactive question 2 are skipped.
    assert _items(rsvqa) == [
        (["Images_LR/0.tif"], "[VQA] Is there a road?", "yes", "vqa"),
        (["Images_LR/0.tif"], "[VQA] How many buildings are there?", "12", "vqa"),
    ]


def test_levircc_reader(levircc: Path) -> None:
    assert detect_format(levircc) == "levir-cc"
    pair = ["images/train/A/train_000001.png", "images/train/B/train_000001.png"]
    assert _items(levircc) == [(pair, CCD_PROMPT, "many houses are built along the road 0", "ccd")]


def test_karpathy_reader(rsicd: Path) -> None:
    assert detect_format(rsicd) == "karpathy-captions"
    answer = "Many planes are parked next to a long building in an airport"
    assert _items(rsicd) == [(["RSICD_images/airport_1.jpg"], "[CAP] Describe this image briefly.", answer, "cap")]


def test_levircd_reader(levircd: Path) -> None:
    assert detect_format(levircd) == "levir-cd"
    pair = ["train/A/train_1.png", "train/B/train_1.png"]
    assert _items(levircd) == [(pair, CSEG_PROMPT, TOP_LEFT_2X2, "cseg")]
    rle = parse_rle_mask(TOP_LEFT_2X2)
    assert rle is not None and rle.labels == ["others", "building"] and int(rle.grid.sum()) == 4


def test_class_folder_readers(aid: Path, tmp_path: Path) -> None:
    assert detect_format(aid) == "class-folders"
    assert _items(aid) == [
        (["Airport/airport_1.jpg"], CLS_PROMPT, "airport", "cls"),
        (["DenseResidential/denseresidential_1.jpg"], CLS_PROMPT, "dense residential", "cls"),
    ]
    ucm = tmp_path / "UCMerced_LandUse"
    _image(ucm / "Images" / "storagetanks" / "storagetanks00.tif")
    _image(ucm / "Images" / "agricultural" / "agricultural00.tif")
    assert detect_format(ucm) == "class-folders"
    assert [a for _, _, a, _ in _items(ucm)] == ["agricultural", "storage tanks"]


def test_loveda_reader(loveda: Path) -> None:
    assert detect_format(loveda) == "loveda"
    image = ["Train/Urban/images_png/0.png"]
    water = "\n".join(["others*8"] * 7 + ["water*8"])
    assert _items(loveda) == [
        (image, "[SEG] building.", TOP_LEFT_2X2, "seg"),
        (image, "[SEG] water.", water, "seg"),
    ]


def test_plain_folder_rotation(plain: Path) -> None:
    assert detect_format(plain) == "plain"
    got = _items(plain)
    assert len(got) == 4 * len(ROTATION)
    first = [(p, t) for _, p, _, t in got[:3]]
    assert first == [
        ("[CAP] Describe this image briefly.", "cap"),
        ("[VG] Where is the building?", "vg"),
        ("[SEG] building.", "seg"),
    ]
    assert all(answer is None for _, _, answer, _ in got)
    assert got[9] == (["sub/d.tif", "sub/d.tif"], CCD_PROMPT, None, "ccd")  # image 3: a no-change pair
    # Every image reaches every expert, and each rotation row really routes to its expert.
    for expert, row in enumerate(ROTATION):
        assert {expert_of(prompt) for _, prompt in row} == {expert}
    assert [expert_of(p) for _, p, _, _ in got] == [0, 1, 2] * 4


def test_detect_format_errors_and_forced_format(tmp_path: Path, plain: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match="no known dataset layout"):
        detect_format(empty)
    with pytest.raises(CalibrationError, match="not a folder"):
        detect_format(tmp_path / "missing")
    assert list(FORMATS)[-1] == "plain"  # the catch-all is tried last
    assert len(_items(plain, "plain")) == 12


@pytest.fixture
def sources(dior: Path, rsvqa: Path, levircc: Path, rsicd: Path, levircd: Path, aid: Path, loveda: Path) -> list[Path]:
    return [dior, rsvqa, levircc, rsicd, levircd, aid, loveda]


def test_build_balances_experts_and_tasks(sources: list[Path], tmp_path: Path) -> None:
    cs = build_calibration_set(sources, tmp_path / "set", size=9, seed=0)
    counts = cs.counts()
    assert [len(cs.items_for_expert(e)) for e in (0, 1, 2)] == [3, 3, 3]
    for tasks in counts.values():
        assert max(tasks.values()) - min(tasks.values()) <= 1
    assert set(counts[1]) == {"vg", "ref"} and set(counts[2]) == {"seg", "cseg"}
    assert len(counts[0]) == 3  # four tasks compete for expert 0's three places
    assert all(i.answer is not None for i in cs.items)  # every source here is labelled
    assert [i.expert for i in cs.items] == [0, 1, 2] * 3  # interleaved: any prefix stays balanced
    for item in cs.items:
        for p in cs.image_paths(item):
            with Image.open(p) as im:
                assert im.format == "PNG" and im.mode == "RGB" and max(im.size) <= MAX_SIDE
    manifest = json.loads((tmp_path / "set" / "calibration.json").read_text())
    assert manifest["content_hash"] == cs.content_hash and manifest["experts"]["2"]["items"] == 3
    # Only [CAP] for expert 0 here: its second place repeats the one caption item, and the summary says so.
    text = calibrate_build_command([sources[0], sources[4], sources[6], sources[3]], tmp_path / "cli", 6, 1)
    assert "expert 2 ([SEG]): 2 items: seg 1, cseg 1" in text and "1 items repeat" in text


def test_plain_folder_fills_every_expert_and_downscales(plain: Path, tmp_path: Path) -> None:
    # 4 images x 3 experts = 12 distinct items; a 13th place (expert 0 gets the extra one) repeats one.
    cs = build_calibration_set([f"plain={plain}"], tmp_path / "set", size=13, seed=3)
    assert [len(cs.items_for_expert(e)) for e in (0, 1, 2)] == [5, 4, 4]
    assert cs.info["repeats"] == 1 and len({(i.prompt, i.source) for i in cs.items}) == 12
    assert all(i.answer is None for i in cs.items)
    big = [i for i in cs.items if i.source == "plain:sub/d.tif"]
    assert big and all(im.size == (MAX_SIDE, 256) for i in big for im in cs.load_images(i))
    with pytest.raises(OptionError):
        build_calibration_set([plain], tmp_path / "small", size=2, seed=0)


def test_missing_expert_is_reported(aid: Path, tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match=r"expert 1 \(\[REF\] \[VG\]\)"):
        build_calibration_set([aid], tmp_path / "set", size=3, seed=0)
    assert not (tmp_path / "set").exists()


def test_hash_stable_and_sensitive(sources: list[Path], levircd: Path, tmp_path: Path) -> None:
    a = build_calibration_set(sources, tmp_path / "a", size=9, seed=0)
    b = build_calibration_set(sources, tmp_path / "b", size=9, seed=0)
    assert a.content_hash == b.content_hash and a.items == b.items
    assert CalibrationSet.load(tmp_path / "a").content_hash == a.content_hash
    _image(levircd / "train" / "B" / "train_1.png", colour=(4, 5, 6))  # the only [SEG] change pair
    c = build_calibration_set(sources, tmp_path / "c", size=9, seed=0)
    assert c.items == a.items and c.content_hash != a.content_hash


def test_tampered_set_fails_to_load(plain: Path, tmp_path: Path) -> None:
    out = tmp_path / "set"
    cs = build_calibration_set([plain], out, size=3, seed=0)
    png = out / cs.items[0].images[0]
    with Image.open(png) as im:
        size = im.size
    Image.new("RGB", size, (255, 0, 0)).save(png)
    with pytest.raises(RsedgeError) as err:
        CalibrationSet.load(out)
    assert isinstance(err.value, CalibrationError) and "fails its hash check" in str(err.value)
    assert "\n" not in str(err.value)

    out2 = tmp_path / "set2"
    build_calibration_set([plain], out2, size=3, seed=0)
    manifest = json.loads((out2 / "calibration.json").read_text())
    manifest["items"][1]["prompt"] = "[VG] Where is the ship?"
    (out2 / "calibration.json").write_text(json.dumps(manifest))
    with pytest.raises(CalibrationError, match="fails its hash check"):
        resolve_calibration(out2)
    (out2 / "calibration.json").unlink()
    with pytest.raises(CalibrationError, match="not a calibration set"):
        CalibrationSet.load(out2)


def test_rs_default(tmp_path: Path) -> None:
    cs = resolve_calibration("rs-default")
    assert cs is rs_default()
    assert [len(cs.items_for_expert(e)) for e in (0, 1, 2)] == [16, 16, 16]
    counts = cs.counts()
    assert {"cseg", "seg"} <= set(counts[2]) and {"vg", "ref"} <= set(counts[1])
    assert any(i.answer and "*" in i.answer for i in cs.items_for_expert(2))  # run-length answers
    assert any(i.answer and i.answer.startswith("[") for i in cs.items_for_expert(1))  # box answers
    # Never the real test split: neither its files nor the same pixels stored elsewhere.
    test_items = [item for item in read_manifest() if item["split"] == "test"]
    test_paths = {(REAL_DIR / f).resolve() for item in test_items for f in item["files"]}
    test_digests = {pixel_digest(prepare_image(p)) for p in test_paths}
    for item in cs.items:
        assert not any(s in item.source for t in test_items for s in (f"real-{t['id']}-", f"/{t['id']}"))
        for p in cs.image_paths(item):
            assert p.resolve() not in test_paths and pixel_digest(prepare_image(p)) not in test_digests
    # Deterministic, and written out it is an ordinary set with the same hash.
    assert rs_default.__wrapped__().content_hash == cs.content_hash
    saved = cs.save(tmp_path / "rs")
    assert CalibrationSet.load(tmp_path / "rs").content_hash == saved.content_hash == cs.content_hash


# -- what a calibration source may not do ---------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["../../outside.jpg", "/{tmp}/outside.jpg", "sub/../../outside.jpg"])
def test_dior_filename_outside_the_dataset_is_refused(dior: Path, filename: str) -> None:
    outside = _image(dior.parent / "outside.jpg", (80, 80))
    name = filename.replace("/{tmp}", str(outside.parent))
    objs = [("vehicle", (8, 8, 16, 24), "The vehicle")]
    (dior / "Annotations" / "00001.xml").write_text(_voc(name, (80, 80), objs))
    with pytest.raises(CalibrationError, match=r"00001\.xml.*outside"):
        list(read_source(dior))


def test_malformed_dior_xml_is_an_error_not_a_plain_set(dior: Path, tmp_path: Path) -> None:
    (dior / "Annotations" / "00001.xml").write_text("<annotation><filename>00001.jpg</filename><object>")
    with pytest.raises(CalibrationError, match=r"00001\.xml"):
        detect_format(dior)
    with pytest.raises(CalibrationError, match=r"00001\.xml"):
        build_calibration_set([dior], tmp_path / "set", size=3, seed=0)
    assert not (tmp_path / "set").exists()


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A PNG of a few bytes whose header claims ``width`` x ``height`` 8-bit RGB: a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda p: Image.new("RGBA", (32, 32), (1, 2, 3, 100)).save(p / "x.png"), "alpha"),
        (lambda p: Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(p / "x.png"), "8-bit"),
        (lambda p: _png_claiming(p / "x.png", 20000, 20000), "too large"),
        (lambda p: _png_claiming(p / "x.png", 9000, 9000), "--max-pixels"),
    ],
    ids=["alpha", "16-bit", "bomb", "over-the-cap"],
)
def test_images_the_runtime_refuses_are_refused(make, needle, tmp_path: Path) -> None:
    from tests.test_bad_input import assert_one_error_line, run

    src = tmp_path / "src"
    src.mkdir()
    make(src)
    with pytest.raises(CalibrationError, match=needle):
        build_calibration_set([src], tmp_path / "set", size=3, seed=0)
    res = run("calibrate", "build", src, "-o", tmp_path / "cli", "--size", "3")
    assert_one_error_line(res, "x.png", needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_calibrate_build_takes_max_pixels(plain: Path, tmp_path: Path, monkeypatch) -> None:
    from rsedge.runtime import images
    from tests.test_bad_input import assert_one_error_line, run

    monkeypatch.setattr(images, "MAX_PIXELS", 1000)  # the fixture's 64x64 images are 4,096 pixels
    assert_one_error_line(run("calibrate", "build", plain, "-o", tmp_path / "a", "--size", "3"), "--max-pixels")
    res = run("calibrate", "build", plain, "-o", tmp_path / "b", "--size", "3", "--max-pixels", "400000")
    assert res.exit_code == 0, res.output
    assert images.MAX_PIXELS == 1000
