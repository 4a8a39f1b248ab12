"""Static INT8 Q/DQ of the vision encoder + connector, calibrated on remote-sensing images.

onnxruntime.quantization does the work: per-channel symmetric INT8 weights, calibrated symmetric INT8
activations (zero-point 0, the explicit-quantization form TensorRT consumes), with the calibrator chosen
by the recipe: min-max, percentile or entropy. Only MatMul and Conv are quantized; the normalisations,
softmax and GELU stay in float, where INT8 costs accuracy and buys little.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

from rsedge.calibration.calibset import CalibrationSet
from rsedge.errors import OptionError
from rsedge.runtime.images import validate_image
from rsedge.runtime.preprocess import preprocess_square

METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "percentile": CalibrationMethod.Percentile,
    "entropy": CalibrationMethod.Entropy,
}


class ImageReader(CalibrationDataReader):
    """One image per call, [1, 3, S, S]: histogram calibrators need every sample in the same shape."""

    def __init__(self, calib: CalibrationSet, image_size: int, input_name: str, dtype: np.dtype) -> None:
        self._it = self._feeds(calib, image_size, input_name, dtype)

    @staticmethod
    def _feeds(calib: CalibrationSet, size: int, name: str, dtype: np.dtype) -> Iterator[dict[str, np.ndarray]]:
        seen: set[str] = set()
        for item in calib.items:
            for rel, img in zip(item.images, calib.load_images(item), strict=True):
                if rel in seen:  # a change pair's images and repeats would weight some scenes twice
                    continue
                seen.add(rel)
                yield {name: preprocess_square(validate_image(img), size).astype(dtype)}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def quantize_vision(src: Path, dst: Path, calib: CalibrationSet, image_size: int, method: str = "percentile") -> Path:
    """Write ``dst`` (+ ``dst.data``): the vision graph with INT8 Q/DQ around its MatMuls and Conv."""
    if method not in METHODS:
        raise OptionError(f"unknown vision calibration method {method!r}; choose {', '.join(METHODS)}")
    import onnx

    inp = onnx.load(str(src), load_external_data=False).graph.input[0]
    dtype = np.float16 if inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else np.float32
    # Float biases: TensorRT takes no INT32 DequantizeLinear, and a bias costs nothing in float.
    extra = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}
    if method == "percentile":
        extra["CalibPercentile"] = 99.99
    with tempfile.TemporaryDirectory(dir=dst.parent) as work:
        cwd = os.getcwd()
        os.chdir(work)  # onnxruntime writes its augmented calibration model to the working directory
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # its pre-processing advice and histogram chatter are not for our users
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    str(src),
                    str(dst),
                    ImageReader(calib, image_size, inp.name, dtype),
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul", "Conv"],
                    per_channel=True,
                    activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    use_external_data_format=True,
                    calibrate_method=METHODS[method],
                    extra_options=extra,
                )
        finally:
            root.setLevel(level)
            os.chdir(cwd)
    return dst
