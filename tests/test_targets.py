"""`rsedge export --target`: each target's graph form, compute dtype, attention and vision, the precisions it
refuses, and the TensorRT check run as part of a JetPack export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from rsedge.cli import main
from rsedge.errors import OptionError
from rsedge.export.targets import TARGETS, export_options


def _export(ckpt: Path, out: Path, *args: str):
    return CliRunner().invoke(main, ["export", str(ckpt), "-o", str(out), *args])


def test_every_target_names_a_runnable_form() -> None:
    assert set(TARGETS) == {"cpu", "cuda", "jp5.1", "jp6.0", "jp6.1", "jp6.2"}
    from rsedge.cli import EXPORT_TARGETS

    assert list(TARGETS) == EXPORT_TARGETS  # the CLI's choices are the targets, in their order
    assert export_options("cuda", "int4", {}) == {
        "precision": "int4", "form": "ort", "compute": "fp16", "attention": "gqa", "vision": "model"
    }  # fmt: skip
    assert export_options("cpu", "int4", {})["vision"] == "int8"
    assert export_options("cpu", "int4", {})["prefill"] == "int8"
    assert "prefill" not in export_options("cuda", "int4", {})
    assert export_options("jp6.1", "int4", {})["form"] == "qdq"
    assert export_options("cpu", "int4", {"vision": "model", "form": None})["vision"] == "model"
    for jp in ("jp5.1", "jp6.0"):
        with pytest.raises(OptionError, match="cannot run int4"):
            export_options(jp, "int4", {})
    with pytest.raises(OptionError, match="takes --form qdq"):
        export_options("jp6.1", "int8", {"form": "ort"})
    with pytest.raises(OptionError, match="portable attention"):
        export_options("jp6.2", "fp16", {"attention": "gqa"})
    assert export_options("cuda", "int4", {"attention": "scatter-shared"})["attention"] == "scatter-shared"


def test_cuda_target_bundle(tiny_checkpoint, tmp_path) -> None:
    r = _export(tiny_checkpoint, tmp_path / "b", "--target", "cuda", "--precision", "int4", "--block-size", "32")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["compute_dtype"] == "fp16" and m["graphs"]["decoder"]["attention"] == "gqa"


def test_jetpack_export_is_checked_and_refused_precisions_leave_nothing(tiny_checkpoint, tmp_path) -> None:
    r = _export(tiny_checkpoint, tmp_path / "jp", "--target", "jp6.1", "--precision", "int8", "--no-validate")
    assert r.exit_code == 0, r.output
    assert "MatMulNBits" not in (tmp_path / "jp" / "decoder_expert0.onnx").read_bytes().decode("latin-1")
    r = _export(tiny_checkpoint, tmp_path / "jp51", "--target", "jp5.1", "--precision", "int4")
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "cannot run int4" in r.output
    assert not (tmp_path / "jp51").exists()


def test_a_bundle_failing_the_tensorrt_check_is_not_left_behind(tiny_checkpoint, tmp_path, monkeypatch) -> None:
    import rsedge.export.targets as targets

    failing = {"problems": ["decoder_expert0.onnx: Foo unsupported"]}
    monkeypatch.setattr(targets, "tensorrt_check", lambda bundle, name, manifest=None: failing)  # run inside the export
    r = _export(tiny_checkpoint, tmp_path / "bad", "--target", "jp6.2", "--precision", "fp16", "--no-validate")
    assert r.exit_code == 2 and "fails the jp6.2 TensorRT check: decoder_expert0.onnx: Foo unsupported" in r.output
    assert not (tmp_path / "bad").exists()
