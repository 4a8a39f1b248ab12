"""Guards inside export: the opset guard of blocked DequantizeLinear, the vision quantizer's working directory,
the engine builder's bundle check, and one checkpoint hash per export."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto

from rsedge.errors import BundleError
from rsedge.export.onnx_builder import OPSET, GraphBuilder
from rsedge.export.weight_store import WeightStore
from rsedge.quantize.blockwise import WeightQuantConfig


class PlanByName:
    def __init__(self, configs: dict[str, WeightQuantConfig]) -> None:
        self.configs = configs

    def weight_quant(self, name: str) -> WeightQuantConfig | None:
        return self.configs.get(name)

    def input_scales(self, name: str, weight_kn) -> np.ndarray | None:
        return None


def test_blocked_dequantize_guard_survives_a_later_int8_linear(tmp_path):
    """An INT4 blocked DequantizeLinear needs opset 21; an INT8 linear built after it must not clear that need."""
    plan = PlanByName(
        {
            "a": WeightQuantConfig(bits=4, block_size=32, form="qdq"),
            "b": WeightQuantConfig(bits=8, block_size=32, form="qdq"),
        }
    )
    rng = np.random.default_rng(0)
    b = GraphBuilder("g", WeightStore(tmp_path), np.float32, "w.bin", plan, opset=OPSET)
    x = b.input("x", TensorProto.FLOAT, [1, 64])
    y = b.linear(x, "a", rng.standard_normal((64, 64)).astype(np.float32))
    b.output(b.linear(y, "b", rng.standard_normal((64, 8)).astype(np.float32)), "y", TensorProto.FLOAT, [1, 8])
    with pytest.raises(ValueError, match="opset 21"):
        b.make_model("", {})


def test_vision_quantizer_keeps_the_working_directory(tiny_bundle, tmp_path, monkeypatch):
    """Library code must not chdir (another thread's relative paths would move): relative paths work as given,
    and nothing lands in the caller's working directory."""
    import json

    from rsedge.calibration.calibset import rs_default
    from rsedge.quantize.vision_int8 import quantize_vision

    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    for name in ("vision.onnx", "vision.bin"):
        shutil.copy(tiny_bundle / name, work / name)
    size = json.loads((tiny_bundle / "manifest.json").read_text())["preprocess"]["image_size"]
    monkeypatch.chdir(work)

    def no_chdir(path):
        raise AssertionError(f"os.chdir({path!r}) called")

    monkeypatch.setattr(os, "chdir", no_chdir)
    out = quantize_vision(Path("vision.onnx"), Path("out/vision_int8.onnx"), rs_default(), size, "minmax")
    assert (work / out).is_file()
    assert Path.cwd() == work
    assert sorted(p.name for p in work.iterdir()) == ["out", "vision.bin", "vision.onnx"]


def test_engine_builder_checks_the_bundle_first(tiny_bundle, tmp_path, monkeypatch):
    """build-engines reads the bundle through Bundle.open: a tampered file is refused before TensorRT is asked."""
    from rsedge.export import trt_build

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    data = bytearray((copy / "vision.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "vision.bin").write_bytes(bytes(data))

    def no_tensorrt(*args, **kwargs):
        raise AssertionError("TensorRT was asked to build from an unchecked bundle")

    monkeypatch.setattr(trt_build, "build_engine", no_tensorrt)
    with pytest.raises(BundleError, match=r"vision\.bin.*sha256"):
        trt_build.build_bundle(copy, tmp_path / "engines")


def test_checkpoint_is_hashed_once_per_export(tiny_checkpoint, tmp_path, monkeypatch):
    from rsedge.export.bundle import export_bundle
    from rsedge.models.rsunivlm import exporter as bundle_mod

    monkeypatch.setenv("RSEDGE_CACHE", str(tmp_path / "cache"))
    calls: list[Path] = []
    real = bundle_mod.checkpoint_hash

    def counted(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(bundle_mod, "checkpoint_hash", counted)
    m = export_bundle(
        tiny_checkpoint, tmp_path / "b", precision="int4", block_size=32, algorithm="awq", validate=False
    )
    assert len(calls) == 1
    assert m["source"]["sha256"] == real(tiny_checkpoint)
