"""Block-wise INT4/INT8 weights: the math, both graph forms in onnxruntime, and quantized bundles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from rsedge.errors import OptionError
from rsedge.export.bundle import export_bundle
from rsedge.export.onnx_builder import QDQ_OPSET, GraphBuilder
from rsedge.export.weight_store import WeightStore
from rsedge.quantize.blockwise import WeightQuantConfig, quantize_blockwise
from rsedge.runtime.pipeline import Pipeline


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True)])
def test_blockwise_error_is_bounded_by_half_a_step(bits, symmetric):
    w = np.random.default_rng(0).standard_normal((200, 24)).astype(np.float32)  # K=200: a padded last block
    bq = quantize_blockwise(w, bits, 64, symmetric)
    err = np.abs(bq.dequantize() - w)
    step = np.repeat(bq.scales.T, 64, axis=0)[:200]  # [K, N] scale of each weight's block
    assert np.all(err <= step / 2 + 1e-6)
    assert bq.codes.max() < 2**bits


class FixedPlan:
    """Every weight quantized the same way, no AWQ scales."""

    def __init__(self, q: WeightQuantConfig | None) -> None:
        self.q = q

    def weight_quant(self, name: str) -> WeightQuantConfig | None:
        return self.q

    def input_scales(self, name: str, weight_kn) -> np.ndarray | None:
        return None


def _linear_graph(tmp: Path, w: np.ndarray, q: WeightQuantConfig | None, dtype=np.float32):
    store = WeightStore(tmp)
    b = GraphBuilder("g", store, dtype, "w.bin", FixedPlan(q), opset=QDQ_OPSET)
    x = b.input("x", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), [3, w.shape[0]])
    b.output(b.linear(x, "w", w), "y", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), [3, w.shape[1]])
    model = b.make_model("", {})
    (tmp / "g.onnx").write_bytes(model.SerializeToString())
    opts = ort.SessionOptions()
    # onnxruntime fuses DQ+MatMul into MatMulNBits at accuracy level 4 (int8 activations) unless told not to.
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(tmp / "g.onnx"), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("form", ["ort", "qdq"])
def test_both_forms_compute_the_dequantized_matmul(bits, form, tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((256, 40)).astype(np.float32)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    q = WeightQuantConfig(bits=bits, block_size=64, form=form, accuracy_level=0)
    y = _linear_graph(tmp_path, w, q).run(None, {"x": x})[0]
    block = 256 if (form, bits) == ("qdq", 8) else 64  # the TensorRT INT8 form is per output channel
    expected = x @ quantize_blockwise(w, bits, block).dequantize()
    np.testing.assert_allclose(y, expected, atol=2e-4, rtol=1e-5)


def test_qdq_graph_declares_int4_and_opset_21(tmp_path):
    w = np.random.default_rng(2).standard_normal((128, 16)).astype(np.float32)
    _linear_graph(tmp_path, w, WeightQuantConfig(bits=4, block_size=128, form="qdq"))
    import onnx

    m = onnx.load(str(tmp_path / "g.onnx"), load_external_data=False)
    assert m.opset_import[0].version == 21
    codes = next(t for t in m.graph.initializer if t.name == "w.q4")
    assert codes.data_type == TensorProto.INT4 and list(codes.dims) == [128, 16]
    dq = next(n for n in m.graph.node if n.op_type == "DequantizeLinear")
    assert {a.name: helper.get_attribute_value(a) for a in dq.attribute} == {"axis": 0, "block_size": 128}


def test_bad_quant_options():
    with pytest.raises(OptionError):
        WeightQuantConfig(bits=3)
    with pytest.raises(OptionError):
        WeightQuantConfig(block_size=48)
    with pytest.raises(OptionError, match="symmetric"):
        WeightQuantConfig(form="qdq", symmetric=False)


@pytest.fixture(scope="module")
def int4_bundles(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("q")
    out = {}
    for name, kw in {
        "int4": {"precision": "int4", "block_size": 32},
        "int8": {"precision": "int8", "block_size": 32},
        "int4-qdq": {"precision": "int4", "block_size": 32, "form": "qdq", "compute": "fp32"},
        "int4-fp16": {"precision": "int4", "block_size": 32, "compute": "fp16"},
    }.items():
        export_bundle(tiny_checkpoint, root / name, **kw)
        out[name] = root / name
    return out


def test_quantized_bundles_record_their_recipe_and_shrink(int4_bundles, tiny_bundle):
    m = json.loads((int4_bundles["int4"] / "manifest.json").read_text())
    assert m["quantization"]["decoder"] == {
        "bits": 4,
        "block_size": 32,
        "symmetric": True,
        "accuracy_level": 4,
        "form": "ort",
    }
    assert all(c["passed"] for c in m["validation"]["graphs"])
    # The reference carries the same dequantized weights (the fused form's q includes the attention scale,
    # which validation takes back out): what differs is int8 activation rounding, far inside the limit.
    for name in ("int4", "int8", "int4-qdq"):
        checks = json.loads((int4_bundles[name] / "manifest.json").read_text())["validation"]["graphs"]
        assert min(c["cosine"] for c in checks if c["graph"].startswith("decoder")) > 0.9995, name

    def decoder_bytes(b: Path) -> int:  # the experts' MLP weights: what quantization is for
        return sum(p.stat().st_size for p in b.glob("decoder_expert*.bin"))

    fp32 = decoder_bytes(tiny_bundle)
    assert decoder_bytes(int4_bundles["int4"]) < decoder_bytes(int4_bundles["int8"]) < 0.4 * fp32


def test_int8_activation_graphs_are_also_checked_with_float_activations(int4_bundles):
    """MatMulNBits at accuracy_level 4 rounds activations; its float-activation twin must match like fp32."""
    for name in ("int4", "int8"):
        root = int4_bundles[name]
        checks = {c["graph"]: c for c in json.loads((root / "manifest.json").read_text())["validation"]["graphs"]}
        for e in range(3):
            twin = checks[f"decoder_expert{e}-weights"]
            assert twin["passed"] and twin["max_abs"] <= 1e-4 + 2e-5 * twin["ref_scale"], (name, e)
        assert checks["vision"]["passed"]
        assert not list(root.glob(".*float-activations.onnx")), "the twin graph is removed"
    # fp16 compute: the twin rounds activations to fp16 itself, so it is held to the fp16 bound, and passes.
    half = json.loads((int4_bundles["int4-fp16"] / "manifest.json").read_text())["validation"]["graphs"]
    assert [c["passed"] for c in half if c["graph"].endswith("-weights")] == [True] * 3
    qdq = json.loads((int4_bundles["int4-qdq"] / "manifest.json").read_text())["validation"]["graphs"]
    assert not any(c["graph"].endswith("-weights") for c in qdq)  # no MatMulNBits node to twin


def test_one_wrongly_scaled_block_fails_quantized_validation(tiny_checkpoint, tmp_path, monkeypatch):
    """A packing error in one weight block (5 % off) is caught by the float-activation twin, which runs first."""
    import rsedge.models.rsunivlm.exporter as bundle_mod
    from rsedge.errors import ExportValidationError

    real = bundle_mod.apply_fake_quant

    def one_block_off(model, cache):
        real(model, cache)
        w = dict(model.named_parameters())["lm.model.layers.0.mlp.0.down_proj.weight"]
        with torch.no_grad():
            w[:, :32] *= 1.05  # what the reference believes; the graph carries the true codes and scales

    monkeypatch.setattr(bundle_mod, "apply_fake_quant", one_block_off)
    with pytest.raises(ExportValidationError, match=r"decoder_expert0-weights disagrees"):
        export_bundle(tiny_checkpoint, tmp_path / "b", precision="int4", block_size=32)
    assert not (tmp_path / "b").exists()


def test_quantized_forms_agree_in_onnxruntime(int4_bundles, samples):
    """MatMulNBits and blocked-DQ graphs come from the same codes: the same answer to rounding."""
    img = [samples / "dior_05863.png"]
    a = Pipeline.load(int4_bundles["int4"]).generate(
        img, "[VG] windmill?", max_new_tokens=6, keep_logits=True, ignore_eos=True
    )
    b = Pipeline.load(int4_bundles["int4-qdq"]).generate(
        img, "[VG] windmill?", max_new_tokens=6, keep_logits=True, ignore_eos=True
    )
    la, lb = a.step_logits[0].astype(np.float64), b.step_logits[0].astype(np.float64)
    assert la @ lb / (np.linalg.norm(la) * np.linalg.norm(lb)) > 0.999


def test_awq_search_helps_when_a_channel_dominates():
    from rsedge.quantize.activations import LinearStats
    from rsedge.quantize.awq import search_scales

    rng = np.random.default_rng(3)
    x = rng.standard_normal((256, 128)).astype(np.float32)
    x[:, 5] *= 40.0  # one salient input channel, as LLM activations have
    w = rng.standard_normal((128, 64)).astype(np.float32)
    stats = LinearStats(np.abs(x).sum(axis=0), x.shape[0], [x])
    res = search_scales(w, stats, WeightQuantConfig(bits=4, block_size=32))
    assert res.alpha > 0 and res.scales is not None
    assert res.awq_mse < 0.8 * res.rtn_mse


def test_awq_export_calibrates_per_expert_and_caches(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("RSEDGE_CACHE", str(tmp_path / "cache"))
    first = export_bundle(tiny_checkpoint, tmp_path / "a", precision="int4", block_size=32, algorithm="awq")
    assert first["calibration"]["name"] == "rs-default"
    assert first["calibration"]["per_expert"] == {"0": 16, "1": 16, "2": 16}
    assert first["calibration"]["statistics_cached"] is False
    assert first["quantization"]["algorithm"] == "awq"
    awq = first["awq"]
    assert any(name.startswith("model.layers.0.mlp.2.") for name in awq)  # the [SEG] expert got its own scales
    assert all(r["awq_mse"] <= r["rtn_mse"] + 1e-12 for r in awq.values())
    assert all(c["passed"] for c in first["validation"]["graphs"])
    second = export_bundle(tiny_checkpoint, tmp_path / "b", precision="int4", block_size=32, algorithm="awq")
    assert second["calibration"]["statistics_cached"] is True
    assert second["calibration"]["sha256"] == first["calibration"]["sha256"]


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_int8_vision_static_qdq_each_calibrator(method, tiny_checkpoint, tmp_path):
    import onnx

    from rsedge.export.trt_support import check_bundle, passes

    m = export_bundle(
        tiny_checkpoint, tmp_path / "b", precision="int8", form="qdq", block_size=32, vision_calibration=method
    )
    assert m["quantization"]["vision"] == "int8" and m["quantization"]["vision_calibration"] == method
    assert m["calibration"]["name"] == "rs-default"
    vision = next(c for c in m["validation"]["graphs"] if c["graph"] == "vision")
    assert vision["passed"] and vision["cosine"] >= 0.99
    graph = onnx.load(str(tmp_path / "b" / "vision_int8.onnx"), load_external_data=False)
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # the attention probabilities stay in float: every Softmax feeds a float MatMul, no QuantizeLinear
    softmax_out = {o for n in graph.graph.node if n.op_type == "Softmax" for o in n.output}
    readers = {n.op_type for n in graph.graph.node if softmax_out & set(n.input)}
    assert softmax_out and readers == {"MatMul"}
    results = check_bundle(tmp_path / "b", "jp6.1")
    assert all(passes(issues) for issues in results.values())


def test_keep_leaves_the_sensitive_part_unquantized(tiny_checkpoint, tmp_path):
    """--keep lm_head: the recipe records it, lm_head stays a float Gemm, every other linear is MatMulNBits."""
    import onnx

    export_bundle(tiny_checkpoint, tmp_path / "b", precision="int4", block_size=32, keep=("lm_head",))
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["quantization"]["exclude"] == ["lm_head"]
    assert all(c["passed"] for c in m["validation"]["graphs"])
    graph = onnx.load(str(tmp_path / "b" / "decoder_expert0.onnx"), load_external_data=False).graph
    head_ops = {n.op_type for n in graph.node if "lm_head" in n.name}
    assert "Gemm" in head_ops and "MatMulNBits" not in head_ops
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == 4 * 2  # qkv, o, gate_up, down per layer


def test_keep_rejects_a_bad_pattern(tiny_checkpoint, tmp_path):
    with pytest.raises(OptionError, match="not a regular expression"):
        export_bundle(tiny_checkpoint, tmp_path / "b", precision="int4", keep=("lm_head(",))
    assert not (tmp_path / "b").exists()


def test_vision_calibration_holds_one_image_at_a_time(tiny_checkpoint, tmp_path, monkeypatch):
    """onnxruntime's histogram calibrators keep every intermediate tensor of a collect_data call; at full
    size that is over a gigabyte per image, so the reader must hand them one image per call."""
    from onnxruntime.quantization import calibrate

    from rsedge.calibration.calibset import rs_default
    from rsedge.quantize.vision_int8 import ImageReader

    held: list[int] = []
    clear = calibrate.HistogramCalibrater.clear_collected_data

    def spy(self):
        held.append(len(self.intermediate_outputs))
        clear(self)

    monkeypatch.setattr(calibrate.HistogramCalibrater, "clear_collected_data", spy)
    m = export_bundle(tiny_checkpoint, tmp_path / "b", precision="int8", block_size=32)
    calib = rs_default()
    images = len({p for item in calib.items for p in calib.image_paths(item)})
    assert m["quantization"]["vision_calibration"] == "percentile"
    assert len(ImageReader(calib, 32, "pixel_values", np.float32)) == images > 1
    assert held.count(1) == images and max(held) == 1  # one image per call, every image seen once
