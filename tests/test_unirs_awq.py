"""UniRS's calibration sets and AWQ: its tasks in its own template, hashed and recorded; an INT4 AWQ export of a tiny
UniRS checkpoint validates and answers like the reference carrying the bundle's dequantized weights: first-step
logits within the INT4 validation tolerance (rsedge.export.validate.TOLERANCES), greedy tokens identical except
where a near tie of the random tiny model flips under INT8 activation rounding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import rsedge.models.unirs.exporter as unirs_exporter
from rsedge.calibration.calibset import CalibrationSet
from rsedge.calibration.readers import CalibrationError
from rsedge.calibration.unirs_set import RS_DEFAULT_UNIRS, rs_default_unirs
from rsedge.cli import main
from rsedge.export.driver import ExportOptions
from rsedge.export.validate import TOLERANCES
from rsedge.models.unirs import export, make_checkpoint
from rsedge.models.unirs.prompt import IMAGE, PAIR, VIDEO
from rsedge.runtime.pipeline import Pipeline
from rsedge.synth.unirs_real import CHANGE_PROMPT, TASKS, VIDEO_PROMPT, pan_frames, unirs_items

NEW_TOKENS = 8
DATA = Path(__file__).parents[1] / "rsedge" / "data"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("unirs_awq")


@pytest.fixture(scope="module")
def checkpoint(root) -> Path:
    return make_checkpoint(root / "ckpt", size="tiny", seed=21)


@pytest.fixture(scope="module")
def small_set(root) -> Path:
    """Eight items (two of each task) saved as a set folder: the export reads it as a user's set."""
    return rs_default_unirs(size=8).save(root / "set").root


def test_builtin_set_has_unirs_tasks_in_its_template_from_the_train_split():
    calib = rs_default_unirs()
    assert calib.name == RS_DEFAULT_UNIRS and calib.info["architecture"] == "unirs"
    assert calib.info["template"] == "vicuna_v1"
    assert {i.task for i in calib.items} == set(TASKS) and all(i.expert == 0 for i in calib.items)
    assert not any(i.prompt.startswith("[") for i in calib.items)  # untagged: vicuna_v1 wraps them at export
    pairs = [i for i in calib.items if i.task == "ccd"]
    assert pairs and all(len(i.images) == 2 and i.prompt == CHANGE_PROMPT for i in pairs)
    assert any(i.answer for i in pairs)  # LEVIR-CC captions teach the change answers
    test_files = {p.relative_to(DATA).as_posix() for i in unirs_items("test") for p in i.files}
    assert not test_files & {rel for i in calib.items for rel in i.images}, "the test split is parity's"
    assert calib.compute_hash() == calib.content_hash == rs_default_unirs().content_hash
    first = [i.task for i in calib.items[:4]]
    assert sorted(first) == sorted(TASKS)  # tasks take turns: any prefix stays balanced


def test_pan_frames_move_across_the_scene():
    scene = Image.fromarray(np.arange(100 * 60 * 3, dtype=np.uint32).reshape(60, 100, 3).astype(np.uint8))
    frames = pan_frames(scene, 8)
    assert len(frames) == 8 and {f.size for f in frames} == {(60, 36)}
    assert np.array_equal(np.asarray(frames[0]), np.asarray(scene)[:36, :60])
    assert np.array_equal(np.asarray(frames[-1]), np.asarray(scene)[-36:, -60:])


def test_rs_default_means_the_unirs_set_and_an_rsunivlm_set_is_refused(checkpoint, small_set, root):
    exporter = unirs_exporter.UniRSExporter(checkpoint, ExportOptions(precision="int4", algorithm="awq").resolve())
    exporter.check()
    assert exporter.calibration_set("rs-default").name == RS_DEFAULT_UNIRS
    saved = exporter.calibration_set(small_set)  # loaded with its hash checked: saving kept items and pixels
    assert saved.content_hash == rs_default_unirs(size=8).content_hash and saved.info["architecture"] == "unirs"
    assert [i.prompt for i in saved.items] == [i.prompt for i in rs_default_unirs(size=8).items]
    other = root / "rsunivlm_set"
    other.mkdir()
    manifest = json.loads((small_set / "calibration.json").read_text())
    del manifest["architecture"]  # a set made before the field (RSUniVLM's): same items, same hash
    (other / "calibration.json").write_text(json.dumps(manifest))
    (other / "images").symlink_to(small_set / "images")
    with pytest.raises(CalibrationError, match="made for rsunivlm prompts, not unirs's") as e:
        exporter.calibration_set(other)
    assert "\n" not in str(e.value)


def test_a_vila_checkpoint_skips_the_sets_pairs(root):
    vila = make_checkpoint(root / "vila", size="tiny", seed=22, change=False)
    exporter = unirs_exporter.UniRSExporter(vila, ExportOptions(precision="int4", algorithm="awq").resolve())
    exporter.check()
    info = exporter.calibration_info(rs_default_unirs())
    assert info["skipped_pairs"] == info["tasks"]["ccd"] > 0


def _requests(frames: int) -> dict[str, tuple[list[Image.Image], str]]:
    scene = Image.open(DATA / "samples" / "dota_P0075.png").convert("RGB")
    pair = [Image.open(DATA / "samples" / f"levircc_test_000289_{s}.png").convert("RGB") for s in "AB"]
    return {
        IMAGE: ([scene], "Describe this image briefly."),
        PAIR: (pair, CHANGE_PROMPT),
        VIDEO: (pan_frames(scene, frames), VIDEO_PROMPT),
    }


def test_int4_awq_export_answers_like_its_reference(checkpoint, small_set, root, monkeypatch):
    monkeypatch.setenv("RSEDGE_CACHE", str(root / "cache"))
    seen = []
    real = unirs_exporter.apply_fake_quant

    def keep(model, cache):  # the reference validation compared the bundle with: the bundle's weights
        real(model, cache)
        seen.append(model)

    monkeypatch.setattr(unirs_exporter, "apply_fake_quant", keep)
    out = root / "int4_awq"
    m = export(checkpoint, out, precision="int4", block_size=32, algorithm="awq", calibration=str(small_set))
    assert all(c["passed"] for c in m["validation"]["graphs"])
    assert m["quantization"]["algorithm"] == "awq" and m["quantization"]["name"] == "int4-w4-awq"
    rec = m["calibration"]
    assert rec["sha256"] == CalibrationSet.load(small_set).content_hash and rec["items"] == 8
    assert rec["template"] == "vicuna_v1" and rec["tasks"] == {t: 2 for t in TASKS}
    assert rec["statistics_cached"] is False
    lmap = unirs_exporter.UniRSExporter(checkpoint, ExportOptions().resolve())
    lmap.check()
    graph_names = set(lmap.linear_map().by_graph)
    assert set(m["awq"]) <= graph_names and any(r["alpha"] > 0 for r in m["awq"].values())

    reference = seen[0]
    pipe = Pipeline.load(out, threads=1)
    flipped = 0
    for kind, (images, prompt) in _requests(reference.cfg.num_video_frames).items():
        ans = pipe.generate(images, prompt, max_new_tokens=NEW_TOKENS, keep_logits=True, ignore_eos=True)
        ids = pipe.family.prompt_ids(prompt, len(images))
        pixels = np.concatenate([pipe.family.pixel_values(im) for im in images])
        ref_tokens, ref_logits = reference.generate(ids, pixels, kind, NEW_TOKENS, eos_token_id=-1)
        a, b = ans.step_logits[0].astype(np.float64), ref_logits[0].astype(np.float64)
        tol = TOLERANCES["int4"]
        assert np.abs(a - b).max() <= tol["atol"] + tol["rtol"] * np.abs(b).max(), kind
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) >= tol["min_cosine"], kind
        # Greedy tokens agree until a step whose reference top-2 margin is within the logits' error there:
        # the random tiny model has near ties, which INT8 activation rounding may flip (then the paths part).
        same = next((k for k, (x, y) in enumerate(zip(ans.tokens, ref_tokens, strict=True)) if x != y), None)
        if same is not None:
            top2 = np.sort(ref_logits[same])[-2:]
            err = np.abs(ans.step_logits[same] - ref_logits[same]).max()
            assert top2[1] - top2[0] <= 2 * err, f"{kind}: token {same} differs without a near tie"
            flipped += 1
    assert flipped <= 1, "at most one request flips a near tie"

    # The statistics are cached by (checkpoint, eval overrides, set): a second export, through the CLI, reads them.
    args = ["export", str(checkpoint), "-o", str(root / "again"), "--precision", "int4", "--algorithm", "awq",
            "--block-size", "32", "--calibration", str(small_set), "--no-validate"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    again = json.loads((root / "again" / "manifest.json").read_text())
    assert again["calibration"]["statistics_cached"] is True and again["awq"] == m["awq"]
