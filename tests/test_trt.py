"""TensorRT: the static parser-support check (runs everywhere) and engine build + run (only where tensorrt imports)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from rsedge.errors import OptionError
from rsedge.export.bundle import export_bundle
from rsedge.export.trt_build import build_engine, default_profiles
from rsedge.export.trt_support import (
    ERROR,
    JETPACK_TARGETS,
    TABLES,
    check_bundle,
    check_graph,
    format_report,
    passes,
    resolve_version,
)
from rsedge.runtime.trt_session import TRT_MISSING, TensorRTUnavailable, TrtSession
from tests.trt_fakes import FakeGpu

BUNDLES = {
    "fp32": {"precision": "fp32"},
    "fp16": {"precision": "fp16"},
    # tiny hidden size is 64: block 64 is the smallest TensorRT takes, block 32 the one it must refuse
    "int4-qdq-64": {"precision": "int4", "form": "qdq", "block_size": 64, "compute": "fp16"},
    "int4-qdq-32": {"precision": "int4", "form": "qdq", "block_size": 32, "compute": "fp16"},
    "int4-ort-64": {"precision": "int4", "form": "ort", "block_size": 64},
    "int8-qdq-64": {"precision": "int8", "form": "qdq", "block_size": 64, "compute": "fp16"},
}
DECODERS = [f"decoder_expert{e}.onnx" for e in range(3)]


@pytest.fixture(scope="module")
def bundles(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("trt")
    for name, kw in BUNDLES.items():  # no PyTorch validation: these tests look at graph structure only
        export_bundle(tiny_checkpoint, root / name, validate=False, **kw)
    return {name: root / name for name in BUNDLES}


def errors(issues):
    return [i for i in issues if i.severity == ERROR]


# -- static check -----------------------------------------------------------------------------------------------


def test_targets_resolve_to_documented_versions():
    assert {t: resolve_version(t) for t in JETPACK_TARGETS} == JETPACK_TARGETS
    assert resolve_version("8.5.2") == "8.5" and resolve_version("10.3.0") == "10.3"
    assert resolve_version("latest") == "10.15"
    with pytest.raises(OptionError, match="no TensorRT support table"):
        resolve_version("7.1")
    assert TABLES["8.5"].opset_max == 17 and TABLES["10.0"].opset_max == 20 and TABLES["10.15"].opset_max == 24
    assert "INT4" not in TABLES["8.6"].dtypes and "INT4" in TABLES["10.0"].dtypes


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("target", ["jp6.0", "jp6.1", "jp6.2", "10.15"])
def test_float_bundles_pass_jetpack6(bundles, precision, target):
    results = check_bundle(bundles[precision], target)
    assert set(results) == {"vision.onnx", *DECODERS}
    assert all(passes(issues) for issues in results.values()), format_report(results, target)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_float_bundles_pass_jetpack51(bundles, precision):
    """TensorRT 8.5 has no LayerNormalization op; the vision graph spells it out, so JetPack 5.1 takes it."""
    results = check_bundle(bundles[precision], "jp5.1")
    assert all(passes(issues) for issues in results.values()), format_report(results, "jp5.1")
    # INT64 position ids are cast to INT32 by TensorRT 8.x: reported, not blocking
    assert any(i.node == "position_ids" and "INT32" in i.reason for i in results["decoder_expert0.onnx"])


@pytest.mark.parametrize("target", ["jp6.1", "jp6.2", "10.0", "10.15"])
def test_int4_qdq_block64_passes_tensorrt10(bundles, target):
    results = check_bundle(bundles["int4-qdq-64"], target)
    assert all(passes(issues) for issues in results.values()), format_report(results, target)


@pytest.mark.parametrize("target", ["jp5.1", "jp6.0"])
def test_int4_qdq_rejected_by_tensorrt8_for_opset_and_int4(bundles, target):
    for graph in DECODERS:
        bad = errors(check_graph(bundles["int4-qdq-64"] / graph, target))
        reasons = " | ".join(i.reason for i in bad)
        assert any(i.op_type == "opset" and "opset 21" in i.reason for i in bad), reasons
        assert any(i.op_type == "initializer" and "INT4" in i.reason for i in bad), reasons
        assert any(i.op_type == "DequantizeLinear" and "INT4" in i.reason for i in bad), reasons


@pytest.mark.parametrize("target", [*JETPACK_TARGETS, "10.15"])
def test_ort_form_rejected_everywhere_for_matmulnbits(bundles, target):
    for graph in DECODERS:
        bad = errors(check_graph(bundles["int4-ort-64"] / graph, target))
        assert any(i.op_type == "com.microsoft::MatMulNBits" for i in bad)


@pytest.mark.parametrize("target", ["jp6.1", "10.15"])
def test_int4_block32_is_flagged(bundles, target):
    bad = errors(check_graph(bundles["int4-qdq-32"] / "decoder_expert0.onnx", target))
    assert bad and all(i.op_type == "DequantizeLinear" and "block size 32" in i.reason for i in bad)


@pytest.mark.parametrize("target", ["jp5.1", "jp6.0", "jp6.1"])
def test_int8_qdq_is_per_channel_and_taken_everywhere(bundles, target):
    """TensorRT block-quantizes INT4 only, so the INT8 TensorRT form uses per-channel (1-D) scales at opset 17."""
    results = check_bundle(bundles["int8-qdq-64"], target)
    assert all(passes(issues) for issues in results.values()), format_report(results, target)
    model = onnx.load(str(bundles["int8-qdq-64"] / "decoder_expert0.onnx"), load_external_data=False)
    assert model.opset_import[0].version == 17
    scales = {t.name: list(t.dims) for t in model.graph.initializer if t.name.endswith(".scales")}
    assert scales and all(len(d) == 1 for d in scales.values())


def test_check_graph_reads_no_weights(bundles, tmp_path):
    """The .onnx alone is checked (external data is never loaded); a missing weight file is itself reported."""
    shutil.copy(bundles["fp16"] / "decoder_expert0.onnx", tmp_path)
    issues = check_graph(tmp_path / "decoder_expert0.onnx", "jp6.1")
    missing = [i for i in issues if "missing" in i.reason]
    assert {i.reason.split()[3] for i in missing} == {"decoder_shared.bin", "decoder_expert0.bin"}
    model = onnx.load(str(bundles["fp16"] / "decoder_expert0.onnx"), load_external_data=False)
    assert passes(check_graph(model, "jp6.1"))  # a ModelProto: nothing on disk to look for


def test_format_report_folds_repeated_findings(bundles):
    results = check_bundle(bundles["int4-ort-64"], "jp6.1")
    text = format_report(results, "jp6.1")
    assert text.startswith("jp6.1 (TensorRT 10.3): FAIL")
    assert "MatMulNBits" in text and "and 8 more" in text
    assert format_report(check_bundle(bundles["fp16"], "jp6.0"), "jp6.0").startswith("jp6.0 (TensorRT 8.6): PASS")


# -- build helpers that need no TensorRT ------------------------------------------------------------------------


def test_default_profiles_from_manifest(bundles):
    manifest = json.loads((bundles["fp16"] / "manifest.json").read_text())
    prof = default_profiles(manifest, max_prompt=32, max_total=96, max_images=3)
    assert set(prof) == {"vision.onnx", *DECODERS}
    assert prof["vision.onnx"] == {"pixel_values": ((1, 3, 64, 64), (1, 3, 64, 64), (3, 3, 64, 64))}
    dec = prof["decoder_expert0.onnx"]
    assert dec["inputs_embeds"] == ((1, 1, 64), (1, 1, 64), (1, 32, 64))
    assert dec["position_ids"] == ((1, 1), (1, 1), (1, 32))
    assert dec["past_key_values.1.value"] == ((1, 2, 0, 16), (1, 2, 48, 16), (1, 2, 95, 16))
    with pytest.raises(OptionError):
        default_profiles(manifest, max_prompt=64, max_total=32, max_images=1)


def test_tensorrt_is_imported_lazily():
    """Importing the build and run modules must work on machines without TensorRT (and not load it where present)."""
    code = "import sys, rsedge.export.trt_build, rsedge.runtime.trt_session; sys.exit('tensorrt' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.skipif(_tensorrt_importable(), reason="tensorrt is installed here")
def test_missing_tensorrt_is_one_clear_error(bundles, tmp_path):
    with pytest.raises(TensorRTUnavailable, match="tensorrt is not installed"):
        build_engine(bundles["fp16"] / "vision.onnx", tmp_path / "v.engine", {})
    with pytest.raises(TensorRTUnavailable, match="build engines on the Jetson"):
        TrtSession(tmp_path / "v.engine")
    assert not (tmp_path / "v.engine").exists()


# -- engine build and run (Jetson / GPU box with tensorrt) ------------------------------------------------------


@pytest.fixture(scope="module")
def engines(bundles, tmp_path_factory):
    if not _tensorrt_importable():
        pytest.skip(TRT_MISSING)
    from rsedge.export.trt_build import build_bundle

    out = tmp_path_factory.mktemp("engines")
    built = build_bundle(
        bundles["fp16"], out, max_prompt=16, max_total=48, max_images=2, workspace_gb=1.0,
        graphs=["vision.onnx", "decoder_expert0.onnx"], timing_cache=out / "timing.cache",
    )  # fmt: skip
    return built


def _session(path):
    try:
        return TrtSession(path)
    except TensorRTUnavailable as e:  # tensorrt present, no CUDA binding for buffers
        pytest.skip(str(e))


def _ort(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.trt
def test_vision_engine_matches_onnxruntime(bundles, engines):
    trt_sess = _session(engines["vision.onnx"])
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float16)
    got = trt_sess.run({"pixel_values": x})["image_features"].astype(np.float32)
    want = _ort(bundles["fp16"] / "vision.onnx").run(None, {"pixel_values": x})[0].astype(np.float32)
    np.testing.assert_allclose(got, want, atol=3e-2, rtol=3e-2)


@pytest.mark.trt
def test_decoder_engine_matches_onnxruntime_prefill_then_decode(bundles, engines):
    trt_sess = _session(engines["decoder_expert0.onnx"])
    ref = _ort(bundles["fp16"] / "decoder_expert0.onnx")
    rng = np.random.default_rng(1)
    past = {f"past_key_values.{i}.{k}": np.zeros((1, 2, 0, 16), np.float16) for i in range(2) for k in ("key", "value")}
    length = 0
    for new in (5, 1):  # prefill on an empty cache, then one decode step on the prefill's cache
        feeds = {
            "inputs_embeds": rng.standard_normal((1, new, 64)).astype(np.float16),
            "position_ids": np.arange(length, length + new, dtype=np.int64)[None],
            **past,
        }
        got = trt_sess.run(feeds)
        names = [o.name for o in ref.get_outputs()]
        want = dict(zip(names, ref.run(None, feeds), strict=True))
        np.testing.assert_allclose(got["logits"], want["logits"], atol=5e-2, rtol=5e-2)
        for name in names[1:]:
            np.testing.assert_allclose(got[name].astype(np.float32), want[name].astype(np.float32), atol=3e-2)
        past = {n.replace("present", "past_key_values"): want[n] for n in names[1:]}
        length += new


# -- build logic against a recording stand-in for the tensorrt module (checks rsedge's calls, not TensorRT) -----


class _FakeTrt:
    """Just enough of the tensorrt API surface build_engine calls; records what it is asked to do."""

    def __init__(self, version: str) -> None:
        self.__version__ = version
        self.calls: list[tuple] = []
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Flags:
            EXPLICIT_BATCH, STRONGLY_TYPED = 0, 5

        class Tensor:
            def __init__(self, vi):
                self.name = vi.name
                self.shape = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]

        class Network:
            def __init__(self, flags):
                self.flags, self.inputs = flags, []
                self.num_inputs = 0

            def get_input(self, i):
                return self.inputs[i]

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                m = onnx.load(path, load_external_data=False)
                self.network.inputs = [Tensor(vi) for vi in m.graph.input]
                self.network.num_inputs = len(self.network.inputs)
                fake.calls.append(("parse", path))
                return True

        class Cache:
            def serialize(self):
                return b"cache"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("workspace", size))

            def set_flag(self, flag):
                fake.calls.append(("flag", flag))

            def add_optimization_profile(self, p):
                fake.calls.append(("profile", dict(p.shapes)))

            def create_timing_cache(self, data):
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                pass

            def get_timing_cache(self):
                return Cache()

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (lo, opt, hi)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.calls.append(("network_flags", flags))
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"engine"

        self.Logger, self.NetworkDefinitionCreationFlag, self.OnnxParser, self.Builder = Logger, Flags, Parser, Builder
        self.MemoryPoolType = type("MemoryPoolType", (), {"WORKSPACE": 0})
        self.BuilderFlag = type("BuilderFlag", (), {"FP16": "FP16", "INT8": "INT8"})


@pytest.mark.parametrize("version,explicit_batch", [("8.6.2", True), ("10.3.0", False)])
def test_build_bundle_calls_with_a_stand_in_tensorrt(bundles, tmp_path, monkeypatch, version, explicit_batch):
    from rsedge.export.trt_build import build_bundle

    fake = _FakeTrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    FakeGpu("Orin", (8, 7)).install(monkeypatch)  # build_bundle records the GPU it builds on
    built = build_bundle(bundles["int4-qdq-64"], tmp_path / "e", max_prompt=8, max_total=32, max_images=2,
                         graphs=["vision.onnx", "decoder_expert0.onnx"], timing_cache=tmp_path / "t.cache")  # fmt: skip
    assert [p.read_bytes() for p in built.values()] == [b"engine", b"engine"]
    assert (tmp_path / "t.cache").read_bytes() == b"cache" and not list((tmp_path / "e").glob(".*"))
    flags = [c[1] for c in fake.calls if c[0] == "network_flags"]
    batch = 1 if explicit_batch else 0
    assert flags == [batch, batch | 1 << 5]  # vision weakly typed; the INT4 decoder strongly typed
    assert [c[1] for c in fake.calls if c[0] == "flag"] == ["FP16"]  # FP16 for vision only: typed graphs set none
    vision, decoder = [c[1] for c in fake.calls if c[0] == "profile"]
    assert vision == {"pixel_values": ((1, 3, 64, 64), (1, 3, 64, 64), (2, 3, 64, 64))}
    assert decoder["past_key_values.0.key"] == ((1, 2, 0, 16), (1, 2, 16, 16), (1, 2, 31, 16))
    assert len(decoder) == 2 + 4  # embeds, position ids, 2 layers x key/value
    record = json.loads((tmp_path / "e" / "engines.json").read_text())
    assert record["tensorrt"] == version and record["gpu"] == {"name": "Orin", "compute_capability": "8.7"}
    engines = record["engines"]
    assert set(engines) == {"vision.onnx", "decoder_expert0.onnx"}
    assert engines["vision.onnx"]["precision"] == {"fp16": True, "int8": False, "strongly_typed": False}
    assert engines["decoder_expert0.onnx"]["precision"] == {"fp16": False, "int8": False, "strongly_typed": True}
    assert engines["decoder_expert0.onnx"]["profile"]["past_key_values.0.key"] == {
        "min": [1, 2, 0, 16], "opt": [1, 2, 16, 16], "max": [1, 2, 31, 16]
    }  # fmt: skip
