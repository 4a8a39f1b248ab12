"""Static INT8 Q/DQ of the vision encoder + connector, calibrated on remote-sensing images.

onnxruntime.quantization does the work: per-channel symmetric INT8 weights, calibrated symmetric INT8
activations (zero-point 0, the explicit-quantization form TensorRT consumes), with the calibrator chosen
by the recipe: min-max, percentile or entropy. Only MatMul and Conv are quantized; the normalisations,
softmax and GELU stay in float, where INT8 costs accuracy and buys little.

The attention probabilities stay in float too: Softmax and the probabilities x V MatMul are excluded
(``attention_probability_nodes``). Quantizing that MatMul puts Q/DQ on both sides of the Softmax, which
onnxruntime's CPU provider fuses into QLinearSoftmax, a table-driven kernel that was 26 % of the
full-size vision graph's time; in float the tower ran 11 % faster, and the probabilities (values in
[0, 1] with a long tail of tiny ones) lose nothing to a per-tensor INT8 scale.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from rsedge.calibration.calibset import CalibrationSet, prepare_image
from rsedge.errors import CheckpointError, OptionError
from rsedge.runtime.images import validate_image
from rsedge.runtime.preprocess import preprocess_square

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}


class WindowedReader(CalibrationDataReader):
    """A sized calibration reader that onnxruntime walks in windows (``set_range``): its histogram calibrators keep
    every intermediate tensor of a ``collect_data`` call in memory, so each window is one image. Subclasses say
    what the ``index``-th image's feeds are."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._next, self._end = 0, count

    def __len__(self) -> int:
        return self._count

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, self._count)

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        self._next += 1
        return self.feeds(self._next - 1)

    def feeds(self, index: int) -> dict[str, np.ndarray]:
        raise NotImplementedError


class ImageReader(WindowedReader):
    """One image per call, [1, 3, S, S]: histogram calibrators need every sample in the same shape.

    Sized and windowed (``set_range``) so that onnxruntime calibrates one image at a time: its histogram
    calibrators keep every intermediate tensor of a ``collect_data`` call in memory, which for a
    SigLIP-so400m tower is over a gigabyte per image, and merge their histograms across calls.
    """

    def __init__(self, calib: CalibrationSet, image_size: int, input_name: str, dtype: np.dtype) -> None:
        self._size, self._name, self._dtype = image_size, input_name, dtype
        # A change pair's images and repeats would weight some scenes twice.
        self._paths = list(dict.fromkeys(p for item in calib.items for p in calib.image_paths(item)))
        super().__init__(len(self._paths))

    def feeds(self, index: int) -> dict[str, np.ndarray]:
        img = validate_image(prepare_image(self._paths[index]))
        return {self._name: preprocess_square(img, self._size).astype(self._dtype)}


def attention_probability_nodes(model: onnx.ModelProto) -> list[str]:
    """The names of every Softmax and of the MatMuls that read its output (through Casts): the attention
    probability path, which ``quantize_vision`` leaves in float."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type != "Softmax":
            continue
        names.append(node.name)
        frontier = list(node.output)
        while frontier:
            for user in consumers.get(frontier.pop(), []):
                if user.op_type == "Cast":  # an FP16 graph may cast the probabilities before the MatMul
                    frontier.extend(user.output)
                elif user.op_type == "MatMul":
                    names.append(user.name)
    if any(not n for n in names):
        raise CheckpointError("the vision graph has an unnamed Softmax or MatMul: its exclusion needs names")
    return names


def quantize_vision(src: Path, dst: Path, calib: CalibrationSet, image_size: int, method: str = "percentile") -> Path:
    """Write ``dst`` (+ ``dst.data``): the vision graph with INT8 Q/DQ around its MatMuls and Conv, the
    attention probability path excepted."""
    check_method(method)
    graph = onnx.load(str(src), load_external_data=False)
    inp = graph.graph.input[0]
    dtype = np.float16 if inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else np.float32
    reader = ImageReader(calib, image_size, inp.name, dtype)
    return static_int8(src, dst, reader, method, ["MatMul", "Conv"], attention_probability_nodes(graph))


def check_method(method: str) -> None:
    if method not in METHODS:
        raise OptionError(f"unknown vision calibration method {method!r}; choose {', '.join(METHODS)}")


def static_int8(
    src: Path, dst: Path, reader: CalibrationDataReader, method: str, op_types: list[str], exclude: list[str]
) -> Path:
    """Every vision tower's static INT8 (the SigLIP tower's and Qwen2.5-VL's): Q/DQ on ``op_types`` except the
    nodes named in ``exclude``, per-channel symmetric INT8 weights, symmetric INT8 activations calibrated by
    ``method`` on ``reader``, float biases (TensorRT takes no INT32 DequantizeLinear, and a bias costs nothing in
    float). Writes ``dst`` + ``dst.data``."""
    extra = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "QuantizeBias": False,
        "CalibStridedMinMax": 1,  # one image per collect_data call: bounded memory for every method
    }
    if method == "percentile":
        extra["CalibPercentile"] = 99.99
    # Absolute paths, and no chdir: the working directory is the whole process's, not this function's.
    # (onnxruntime writes its augmented calibration model to a temporary folder of its own.)
    src, dst = Path(src).resolve(), Path(dst).resolve()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its pre-processing advice and histogram chatter are not for our users
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(src),
                str(dst),
                reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=op_types,
                nodes_to_exclude=exclude,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                use_external_data_format=True,
                calibrate_method=METHODS[method],
                extra_options=extra,
            )
    finally:
        root.setLevel(level)
    return dst
