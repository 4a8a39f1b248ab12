"""The INT8 vision graph keeps its attention probabilities in float: no QLinearSoftmax on the CPU provider, and
the tower still matches the FP32 graph on real sample images within the export's INT8 vision tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from PIL import Image

from rsedge.calibration.calibset import rs_default
from rsedge.demo import SAMPLES
from rsedge.export.validate import compare
from rsedge.quantize.vision_int8 import attention_probability_nodes, quantize_vision
from rsedge.runtime.images import validate_image
from rsedge.runtime.preprocess import preprocess_square


@pytest.fixture(scope="module")
def vision_pair(tiny_bundle, tmp_path_factory) -> tuple[Path, Path, int]:
    """The tiny bundle's FP32 vision graph and its INT8 quantization (min-max: the quickest calibrator)."""
    size = json.loads((tiny_bundle / "manifest.json").read_text())["preprocess"]["image_size"]
    out = quantize_vision(tiny_bundle / "vision.onnx", tmp_path_factory.mktemp("vq") / "vision_int8.onnx",
                          rs_default(), size, "minmax")  # fmt: skip
    return tiny_bundle / "vision.onnx", out, size


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def test_attention_probabilities_carry_no_qdq(vision_pair):
    fp32, int8, _ = vision_pair
    graph = onnx.load(str(int8), load_external_data=False).graph
    producer = _producers(graph)
    softmax = [n for n in graph.node if n.op_type == "Softmax"]
    assert softmax, "the tiny tower has attention layers"
    readers = [n for n in graph.node if any(producer.get(i) in softmax for i in n.input)]
    # Softmax -> MatMul directly: no QuantizeLinear on the probabilities, so nothing for a QLinearSoftmax fusion.
    assert readers and {n.op_type for n in readers} == {"MatMul"}
    # The other MatMuls are still quantized: every input of the Q.K^T and projection MatMuls is dequantized.
    others = [n for n in graph.node if n.op_type == "MatMul" and n not in readers]
    assert others and all(producer[i].op_type == "DequantizeLinear" for n in others for i in n.input)
    # The excluded names are the float graph's Softmax and probabilities x V MatMul nodes, one pair per layer.
    names = attention_probability_nodes(onnx.load(str(fp32), load_external_data=False))
    assert sorted(names) == sorted([n.name for n in softmax] + [n.name for n in readers])


def test_cpu_provider_fuses_no_qlinear_softmax(vision_pair, tmp_path):
    """What onnxruntime's CPU provider runs: its QDQ fusions make QLinearMatMul of the quantized MatMuls, and no
    QLinearSoftmax (the old graph had one per layer)."""
    _, int8, _ = vision_pair
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(int8), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath, load_external_data=False).graph.node]
    assert "QLinearSoftmax" not in ops
    assert ops.count("Softmax") == 2 and "QLinearMatMul" in ops  # tiny tower: two layers, INT8 elsewhere


def test_int8_tower_matches_fp32_on_sample_images(vision_pair):
    fp32, int8, size = vision_pair
    paths = sorted(p for p in SAMPLES.iterdir() if p.suffix in (".png", ".jpg"))
    assert len(paths) >= 4
    pixels = [preprocess_square(validate_image(Image.open(p).convert("RGB")), size) for p in paths]

    def features(path: Path) -> np.ndarray:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return np.concatenate([sess.run(None, {name: x.astype(np.float32)})[0] for x in pixels])

    check = compare("vision", features(int8), features(fp32), "vision-int8")
    assert check.passed, check
