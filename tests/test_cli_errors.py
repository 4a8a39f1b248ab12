"""`rsedge run` and `rsedge export`: what used to end in a traceback ends in one `error:` line, exit 2, and
nothing written."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.test_bad_input import VG, assert_one_error_line, run

IMAGE = "dior_05863.png"


def _no_leftovers(folder: Path, name: str) -> None:
    """Neither ``name`` nor a hidden temporary folder for it is in ``folder``."""
    assert not os.path.lexists(folder / name)
    assert not [p.name for p in folder.iterdir() if p.name.startswith(f".{name}.")]


def _deny_reads(monkeypatch, target: Path) -> None:
    """Make ``target`` unreadable: chmod 000, and for root (whom chmod does not stop) the open calls fail the
    way the kernel fails them for anyone else."""
    target.chmod(0)
    try:
        with open(target, "rb"):
            pass
    except PermissionError:
        return
    real_open, real_os_open = builtins.open, os.open
    denied = os.path.realpath(target)

    def check(file) -> None:
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) == denied:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))

    def fake_open(file, *args, **kwargs):
        check(file)
        return real_open(file, *args, **kwargs)

    def fake_os_open(file, *args, **kwargs):
        check(file)
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)


# -- rsedge run ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [(), ("--temperature", "0.7")])
def test_negative_seed(extra, tiny_bundle, samples):
    res = run("run", tiny_bundle, "--image", samples / IMAGE, "--prompt", VG, "--seed", "-5", *extra)
    assert_one_error_line(res, "seed", "-5")


def test_unreadable_bundle_file(tiny_bundle, tmp_path, samples, monkeypatch):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    _deny_reads(monkeypatch, copy / "decoder_expert1.bin")
    res = run("run", copy, "--image", samples / IMAGE, "--prompt", VG, "--max-new-tokens", "2")
    assert_one_error_line(res, "decoder_expert1.bin", "Permission denied")


@pytest.mark.parametrize(
    "rel",
    ["tokenizer/tokenizer.json", "decoder_shared.bin", "vision.bin", "decoder_expert1.bin", "decoder_expert1.onnx"],
)
def test_verify_none_on_truncated_files(rel, tiny_bundle, tmp_path, samples):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    data = (copy / rel).read_bytes()
    (copy / rel).write_bytes(data[: len(data) // 2])
    res = run("run", copy, "--image", samples / IMAGE, "--prompt", VG, "--max-new-tokens", "2", "--verify", "none")
    assert_one_error_line(res, str(copy))


# -- rsedge export ------------------------------------------------------------------------------------------


@pytest.fixture
def no_checkpoint_reading(monkeypatch):
    """Fail the test if export reads the checkpoint's weights: a bad output path must be refused first."""
    from rsedge.models.rsunivlm import exporter as bundle_mod

    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the output path was checked")

    monkeypatch.setattr(bundle_mod, "load_checkpoint_tensors", refuse)


def test_export_into_a_read_only_folder(tiny_checkpoint, tmp_path, monkeypatch, no_checkpoint_reading):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    if os.access(parent, os.W_OK):  # root: make mkdir fail there as the kernel does for everyone else
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):
            if Path(path).parent == parent:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)
    try:
        res = run("export", tiny_checkpoint, "-o", parent / "bundle")
        assert_one_error_line(res, "ro", "ermission denied")
        _no_leftovers(parent, "bundle")
    finally:
        parent.chmod(0o755)


def test_export_under_a_file(tiny_checkpoint, tmp_path, no_checkpoint_reading):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    res = run("export", tiny_checkpoint, "-o", tmp_path / "notes.txt" / "bundle")
    assert_one_error_line(res, "notes.txt", "not a folder")
    assert (tmp_path / "notes.txt").read_text() == "a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_export_to_a_dangling_symlink(tiny_checkpoint, tmp_path, no_checkpoint_reading):
    (tmp_path / "bundle").symlink_to(tmp_path / "gone")
    res = run("export", tiny_checkpoint, "-o", tmp_path / "bundle")
    assert_one_error_line(res, "bundle", "symlink")
    assert (tmp_path / "bundle").is_symlink() and not (tmp_path / "gone").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle.")]


def test_export_on_a_full_disk(tiny_checkpoint, tmp_path, monkeypatch):
    """The last write (the manifest) fails with ENOSPC: one line, and every byte written so far is removed."""
    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == "manifest.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    res = run("export", tiny_checkpoint, "-o", tmp_path / "bundle", "--no-validate")
    assert_one_error_line(res, "bundle", "No space left on device")
    _no_leftovers(tmp_path, "bundle")


@pytest.mark.parametrize(
    "damage,needle",
    [(lambda b: b[: len(b) // 2], "model.safetensors"), (lambda b: os.urandom(5000), "model.safetensors")],
    ids=["truncated", "garbage"],
)
def test_export_of_a_damaged_safetensors_file(damage, needle, tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    f = ckpt / "model.safetensors"
    f.write_bytes(damage(f.read_bytes()))
    res = run("export", ckpt, "-o", tmp_path / "bundle")
    assert_one_error_line(res, needle, "safetensors")
    _no_leftovers(tmp_path, "bundle")


@pytest.mark.parametrize("validate", [(), ("--no-validate",)])
def test_export_refuses_non_finite_weights(validate, tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    tensors = load_file(str(ckpt / "model.safetensors"))
    name = "model.layers.0.mlp.1.down_proj.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(ckpt / "model.safetensors"))
    res = run("export", ckpt, "-o", tmp_path / "bundle", *validate)
    assert_one_error_line(res, name, "NaN")
    _no_leftovers(tmp_path, "bundle")


@pytest.mark.parametrize(
    "table,needle",
    [('{"[SEG]": "x"}', "[SEG]"), ('{"[SEG]": 2.5}', "[SEG]"), ('{"[SEG]": true}', "[SEG]"), ("[2, 1]", "JSON object")],
)
def test_export_with_a_bad_router(table, needle, tiny_checkpoint, tmp_path, no_checkpoint_reading):
    res = run("export", tiny_checkpoint, "-o", tmp_path / "bundle", "--router", table)
    assert_one_error_line(res, needle, "router")
    _no_leftovers(tmp_path, "bundle")


def test_the_loser_of_two_concurrent_exports(tiny_checkpoint, tmp_path, monkeypatch):
    """Both exports pass the early check; the other one moves its bundle into place first. This one must say so
    in one line, leave the winner's bundle as it is, and remove its own temporary folder."""
    from rsedge.models.rsunivlm import exporter as bundle_mod

    out = tmp_path / "bundle"
    real = bundle_mod.copy_tokenizer

    def winner_finishes_meanwhile(*args, **kwargs):
        out.mkdir()
        (out / "manifest.json").write_text(json.dumps({"winner": True}))
        return real(*args, **kwargs)

    monkeypatch.setattr(bundle_mod, "copy_tokenizer", winner_finishes_meanwhile)
    res = run("export", tiny_checkpoint, "-o", out, "--no-validate")
    assert_one_error_line(res, "bundle", "already exists")
    assert json.loads((out / "manifest.json").read_text()) == {"winner": True}
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle.")]


def test_router_check_survives_python_O(tiny_checkpoint, tmp_path):
    """`python -O` strips asserts: the --router check must be a real one."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    args = ["export", str(tiny_checkpoint), "-o", str(tmp_path / "b"), "--router", "[2, 1]"]
    res = subprocess.run(
        [sys.executable, "-O", "-m", "rsedge.cli", *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["error: --router must be a JSON object mapping tags to expert indices"]
    _no_leftovers(tmp_path, "b")
