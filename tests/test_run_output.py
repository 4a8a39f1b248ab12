"""What `rsedge run` writes: the --overlay file (never over an input or an existing file unasked, normal
permissions, atomically) and --json with the generated token ids."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from rsedge.runtime.outputs import Box
from rsedge.runtime.pipeline import Answer, Pipeline
from tests.test_bad_input import VG, assert_one_error_line, run


@pytest.fixture
def boxed_answer(monkeypatch) -> list[int]:
    """Pipeline.generate answers with one box (the tiny random model rarely does); counts its calls."""
    calls: list[int] = []

    def generate(self, images, prompt, **kwargs):
        calls.append(1)
        return Answer(text="[10, 10, 50, 50]", tokens=[5, 6], tag="[VG]", expert=1, boxes=[Box(4, 4, 20, 20)])

    monkeypatch.setattr(Pipeline, "generate", generate)
    return calls


@pytest.fixture
def image(tmp_path, samples) -> Path:
    p = tmp_path / "scene.png"
    shutil.copy(samples / "dior_05863.png", p)
    return p


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def run_overlay(bundle: Path, image: Path, overlay: Path, *extra: str):
    return run("run", bundle, "--image", image, "--prompt", VG, "--max-new-tokens", "2", "--overlay", overlay, *extra)


def test_overlay_has_normal_permissions(tiny_bundle, image, tmp_path, boxed_answer, umask_022):
    out = tmp_path / "overlay.png"
    res = run_overlay(tiny_bundle, image, out)
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overlay.png", "scene.png"]  # no temp file left


def test_existing_overlay_is_kept_without_force(tiny_bundle, image, tmp_path, boxed_answer):
    out = tmp_path / "overlay.png"
    out.write_bytes(b"keep me")
    assert_one_error_line(run_overlay(tiny_bundle, image, out), "already exists", "--force")
    assert out.read_bytes() == b"keep me"
    assert boxed_answer == []  # refused before the model ran


def test_force_replaces_an_existing_overlay(tiny_bundle, image, tmp_path, boxed_answer, umask_022):
    out = tmp_path / "overlay.png"
    out.write_bytes(b"old")
    os.chmod(out, 0o600)
    res = run_overlay(tiny_bundle, image, out, "--force")
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:4] == b"\x89PNG" and stat.S_IMODE(out.stat().st_mode) == 0o644


@pytest.mark.parametrize("alias", ["same", "symlink", "hardlink", "dotted"])
def test_input_image_is_never_overwritten(alias, tiny_bundle, image, tmp_path, boxed_answer):
    before = image.read_bytes()
    target = {
        "same": image,
        "symlink": tmp_path / "link.png",
        "hardlink": tmp_path / "hard.png",
        "dotted": tmp_path / "." / "scene.png",
    }[alias]
    if alias == "symlink":
        target.symlink_to(image)
    elif alias == "hardlink":
        os.link(image, target)
    assert_one_error_line(run_overlay(tiny_bundle, image, target, "--force"), "input image")
    assert image.read_bytes() == before
    assert boxed_answer == []


def test_overlay_folder_is_one_error_line(tiny_bundle, image, tmp_path, boxed_answer):
    (tmp_path / "outdir").mkdir()
    assert_one_error_line(run_overlay(tiny_bundle, image, tmp_path / "outdir", "--force"), "outdir", "folder")


def test_json_has_token_ids(tiny_bundle, samples):
    res = run(
        "run", tiny_bundle, "--image", samples / "dior_05863.png", "--prompt", VG, "--max-new-tokens", "5", "--json"
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    want = Pipeline.load(tiny_bundle).generate([samples / "dior_05863.png"], VG, max_new_tokens=5).tokens
    assert out["token_ids"] == want and len(want) == out["tokens"]
    assert all(isinstance(t, int) for t in out["token_ids"])
