"""Every kind of bad input gets one clear error line on stderr and a non-zero exit, nothing half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from rsedge.cli import main

VG = "[VG] Where is the windmill?"


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_error_line(res, *needles: str) -> None:
    assert res.exit_code != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") or lines[0].startswith("Error: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]


def bad_images(tmp: Path) -> dict[str, tuple[Path, str]]:
    corrupt = tmp / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    good = tmp / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(good)
    truncated = tmp / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    rgba = tmp / "rgba.png"
    Image.new("RGBA", (32, 32), (10, 20, 30, 128)).save(rgba)
    deep = tmp / "sixteen.png"
    Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)).save(deep)
    thin = tmp / "thin.png"
    Image.new("RGB", (1, 32)).save(thin)
    return {
        "missing": (tmp / "nope.png", "nope.png"),
        "corrupt": (corrupt, "corrupt.png"),
        "truncated": (truncated, "truncated.png"),
        "alpha": (rgba, "alpha"),
        "16-bit": (deep, "8-bit"),
        "one pixel wide": (thin, "thin.png"),
    }


@pytest.mark.parametrize("case", ["missing", "corrupt", "truncated", "alpha", "16-bit", "one pixel wide"])
def test_bad_image(case, tiny_bundle, tmp_path):
    path, needle = bad_images(tmp_path)[case]
    res = run("run", tiny_bundle, "--image", path, "--prompt", VG, "--max-new-tokens", "2")
    assert_one_error_line(res, needle)


def test_unknown_task_tag(tiny_bundle, samples):
    res = run("run", tiny_bundle, "--image", samples / "dior_05863.png", "--prompt", "[DETECT] planes")
    assert_one_error_line(res, "[DETECT]")


def test_image_count_mismatch(tiny_bundle, samples):
    res = run("run", tiny_bundle, "--image", samples / "dior_05863.png", "--prompt", "<image> <image>\n[CCD] changes?")
    assert_one_error_line(res, "placeholders")


@pytest.mark.parametrize(
    "opt,value,needle",
    [
        ("--temperature", "-1", "temperature"),
        ("--top-p", "0", "top-p"),
        ("--max-new-tokens", "0", "max_new_tokens"),
        ("--expert", "7", "expert"),
        ("--threads", "0", "threads"),
    ],
)
def test_out_of_range_option(opt, value, needle, tiny_bundle, samples):
    res = run("run", tiny_bundle, "--image", samples / "dior_05863.png", "--prompt", VG, opt, value)
    assert_one_error_line(res, needle)


def test_not_a_bundle(tmp_path, samples):
    res = run("run", tmp_path, "--image", samples / "dior_05863.png", "--prompt", VG)
    assert_one_error_line(res, "not a bundle")


def test_wrong_format_version(tiny_bundle, tmp_path, samples):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(m))
    res = run("run", copy, "--image", samples / "dior_05863.png", "--prompt", VG)
    assert_one_error_line(res, "format version 99")


def test_tampered_bundle(tiny_bundle, tmp_path, samples):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    target = copy / "decoder_expert1.bin"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    res = run("run", copy, "--image", samples / "dior_05863.png", "--prompt", VG)
    assert_one_error_line(res, "decoder_expert1.bin", "sha256")


def test_checkpoint_with_missing_tensor(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    del tensors["model.layers.1.mlp.2.up_proj.weight"]
    save_file(tensors, str(ckpt / "model.safetensors"))
    res = run("export", ckpt, "-o", tmp_path / "bundle")
    assert_one_error_line(res, "model.layers.1.mlp.2.up_proj.weight", "missing")
    assert not (tmp_path / "bundle").exists()
    assert not any(p.name.startswith(".bundle") for p in tmp_path.iterdir())


def test_checkpoint_with_misshapen_tensor(tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors["model.mm_projector.0.bias"] = tensors["model.mm_projector.0.bias"][:-1].clone()
    save_file(tensors, str(ckpt / "model.safetensors"))
    res = run("export", ckpt, "-o", tmp_path / "bundle")
    assert_one_error_line(res, "model.mm_projector.0.bias", "shape")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    res = run("export", tmp_path / "empty", "-o", tmp_path / "bundle")
    assert_one_error_line(res, "config.json")
