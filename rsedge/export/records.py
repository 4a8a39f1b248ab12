"""Manifest records every exporter writes the same way: a graph's inputs and outputs, the tool versions."""

from __future__ import annotations

import contextlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import onnx

import rsedge

ONNX_TYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64"}


def tool_versions() -> dict[str, str]:
    out = {"rsedge": rsedge.__version__}
    for pkg in ("torch", "transformers", "onnx", "onnxruntime", "tokenizers", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def graph_io(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    def describe(vi: onnx.ValueInfoProto) -> dict[str, Any]:
        t = vi.type.tensor_type
        dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        return {"name": vi.name, "shape": dims, "dtype": ONNX_TYPES.get(t.elem_type, str(t.elem_type))}

    return {"inputs": [describe(v) for v in model.graph.input], "outputs": [describe(v) for v in model.graph.output]}
