"""A bundle's manifest cannot make the runtime open anything outside the bundle or anything unhashed.

Every path it names stays in the folder (no absolute path, no ``..``, no symlink out), every file opened is in
the hashed ``files`` list (ONNX external data included), array extents fit their files before any mmap, and
garbage fields are one error line.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from rsedge.errors import BundleError
from rsedge.runtime.bundle import Bundle, sha256_file
from tests.test_bad_input import VG, assert_one_error_line, run


def copy_bundle(src: Path, tmp: Path) -> Path:
    dst = tmp / "bundle"
    shutil.copytree(src, dst)
    return dst


def edit_manifest(bundle: Path, change) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    change(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


def rehash(bundle: Path, rel: str) -> None:
    """Record a changed file's new size and hash, as a forger would."""
    p = bundle / rel

    def change(m: dict[str, Any]) -> None:
        m["files"][rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}

    edit_manifest(bundle, change)


def run_bundle(bundle: Path, samples: Path, *extra: str):
    return run("run", bundle, "--image", samples / "dior_05863.png", "--prompt", VG, "--max-new-tokens", "2", *extra)


def set_field(path: str, value: Any):
    def change(m: dict[str, Any]) -> None:
        node = m
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value

    return change


# -- paths the manifest names ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("tokenizer.file", "../outside/secret.json"),
        ("tokenizer.file", "/etc/passwd"),
        ("graphs.vision.file", "../outside/secret.json"),
        ("graphs.decoder.experts.1.file", "/etc/passwd"),
        ("arrays.embed_tokens.file", "/dev/zero"),
        ("arrays.image_newline.file", "../outside/secret.json"),
    ],
)
def test_manifest_fields_cannot_name_outside_files(field, value, tiny_bundle, tmp_path, samples):
    b = copy_bundle(tiny_bundle, tmp_path)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.json").write_text("{}")
    edit_manifest(b, set_field(field, value))
    res = run_bundle(b, samples)
    assert_one_error_line(res, field, "not among the bundle's hashed files")


@pytest.mark.parametrize("name", ["../outside/secret.json", "/etc/passwd", "tokenizer/../../outside/secret.json"])
def test_files_list_cannot_name_outside_files(name, tiny_bundle, tmp_path, samples):
    b = copy_bundle(tiny_bundle, tmp_path)
    (tmp_path / "outside").mkdir()
    secret = tmp_path / "outside" / "secret.json"
    secret.write_text("x" * 1234)
    edit_manifest(b, lambda m: m["files"].update({name: {"bytes": 1, "sha256": "0" * 64}}))
    res = run_bundle(b, samples, "--verify", "size")
    assert_one_error_line(res, "not a path inside the bundle")
    assert "1234" not in res.stderr  # nothing about the outside file is disclosed
    secret.unlink()
    assert run_bundle(b, samples, "--verify", "size").stderr == res.stderr  # same answer whether it exists


@pytest.mark.parametrize("verify", ["sha256", "none"])
def test_symlinks_out_of_the_bundle_are_refused(verify, tiny_bundle, tmp_path, samples):
    b = copy_bundle(tiny_bundle, tmp_path)
    outside = tmp_path / "tokenizer.json"
    shutil.copy(b / "tokenizer" / "tokenizer.json", outside)  # identical bytes: the hash alone would pass it
    (b / "tokenizer" / "tokenizer.json").unlink()
    (b / "tokenizer" / "tokenizer.json").symlink_to(outside)
    assert_one_error_line(run_bundle(b, samples, "--verify", verify), "tokenizer/tokenizer.json", "outside the bundle")


def test_device_file_is_never_read(tiny_bundle, tmp_path, samples):
    """A weight file linked to /dev/zero: refused at once, not read until memory runs out."""
    b = copy_bundle(tiny_bundle, tmp_path)
    (b / "decoder_shared.bin").unlink()
    (b / "decoder_shared.bin").symlink_to("/dev/zero")
    assert_one_error_line(run_bundle(b, samples, "--verify", "none"), "decoder_shared.bin", "outside the bundle")


def test_listed_entry_must_be_a_regular_file(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle, tmp_path)
    (b / "extra").mkdir()
    edit_manifest(b, lambda m: m["files"].update({"extra": {"bytes": 0, "sha256": "0" * 64}}))
    with pytest.raises(BundleError, match="extra is not a regular file"):
        Bundle.open(b, verify="none")


def test_path_resolves_only_hashed_files(tiny_bundle):
    b = Bundle.open(tiny_bundle, verify="none")
    assert b.path("vision.onnx") == (tiny_bundle / "vision.onnx").resolve()
    for rel in ("manifest.json", "../manifest.json", "/etc/passwd", "nope.bin"):
        with pytest.raises(BundleError, match="not among the files the manifest hashes"):
            b.path(rel)


# -- ONNX external data ------------------------------------------------------------------------------------


@pytest.mark.parametrize("verify", ["sha256", "none"])
def test_unlisted_weight_file_is_not_loaded_unchecked(verify, tiny_bundle, tmp_path, samples):
    """Dropping a weight file's entry from `files` must not let its graph read it without a hash check."""
    b = copy_bundle(tiny_bundle, tmp_path)
    edit_manifest(b, lambda m: m["files"].pop("decoder_expert1.bin"))
    res = run_bundle(b, samples, "--verify", verify)
    assert_one_error_line(res, "decoder_expert1.onnx", "decoder_expert1.bin", "not among the hashed files")


@pytest.mark.parametrize("location", ["../vision.bin", "/tmp/vision.bin"])
def test_graph_external_data_outside_is_refused(location, tiny_bundle, tmp_path, samples):
    b = copy_bundle(tiny_bundle, tmp_path)
    shutil.copy(b / "vision.bin", tmp_path / "vision.bin")
    model = onnx.load(str(b / "vision.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(model, str(b / "vision.onnx"))
    rehash(b, "vision.onnx")  # a consistent manifest: only the location check stands in the way
    res = run_bundle(b, samples)
    assert_one_error_line(res, "vision.onnx", "outside the bundle")


def test_external_locations_match_onnx(tiny_bundle):
    from onnx.external_data_helper import _get_all_tensors

    from rsedge.runtime.onnx_refs import graph_external_locations

    for graph in sorted(tiny_bundle.glob("*.onnx")):
        model = onnx.load(str(graph), load_external_data=False)
        want = {e.value for t in _get_all_tensors(model) for e in t.external_data if e.key == "location"}
        assert graph_external_locations(graph) == want and want


def test_onnxruntime_refusal_is_one_line(tiny_bundle, tmp_path, samples):
    """With --verify none a truncated weight file reaches onnxruntime; its refusal is still one line."""
    b = copy_bundle(tiny_bundle, tmp_path)
    data = (b / "vision.bin").read_bytes()
    (b / "vision.bin").write_bytes(data[: len(data) // 2])
    assert_one_error_line(run_bundle(b, samples, "--verify", "none"), "onnxruntime refused a graph")


# -- arrays -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,needle",
    [
        (set_field("arrays.embed_tokens.shape", [10**9, 64]), "needs"),
        (set_field("arrays.embed_tokens.offset", 10**12), "needs"),
        (set_field("arrays.image_newline.dtype", "object"), "dtype"),
        (set_field("arrays.image_newline.shape", [-4]), "shape"),
        (set_field("arrays.embed_tokens.offset", "0"), "offset"),
    ],
)
def test_array_extents_are_checked_before_mapping(change, needle, tiny_bundle, tmp_path, samples):
    b = copy_bundle(tiny_bundle, tmp_path)
    edit_manifest(b, change)
    assert_one_error_line(run_bundle(b, samples, "--verify", "none"), needle)


def test_array_checked_against_the_file_as_it_is(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle, tmp_path)
    bundle = Bundle.open(b, verify="none")
    assert isinstance(bundle.array("embed_tokens"), np.memmap)
    os.truncate(b / "decoder_shared.bin", 1000)  # shorter than the manifest says; verify="none" did not look
    with pytest.raises(BundleError, match="embed_tokens"):
        bundle.array("embed_tokens")


# -- garbage fields -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda m: m.pop("graphs"), "graphs.decoder.experts"),
        (set_field("graphs.decoder.experts", "x"), "graphs.decoder.experts"),
        (set_field("graphs.decoder.experts", {"0": {}, "1": {}, "2": {}}), "graphs.decoder.experts.0.file"),
        (set_field("tokenizer.stop_token_ids", "abc"), "tokenizer.stop_token_ids"),
        (set_field("model.text.hidden_size", "64"), "model.text.hidden_size"),
        (lambda m: m["arrays"].pop("embed_tokens"), "arrays.embed_tokens"),
        (set_field("router.table", {"[VG]": 9}), "router.table"),
        (set_field("preprocess.kind", "weird"), "preprocess.kind"),
        (set_field("files", ["vision.onnx"]), "lists no files"),
        (lambda m: m["files"]["vision.onnx"].pop("sha256"), "sha256"),
        (lambda m: m.pop("tokenizer"), "tokenizer"),
    ],
)
def test_garbage_manifest_fields_are_one_line(change, needle, tiny_bundle, tmp_path, samples):
    b = copy_bundle(tiny_bundle, tmp_path)
    edit_manifest(b, change)
    assert_one_error_line(run_bundle(b, samples, "--verify", "none"), needle)
