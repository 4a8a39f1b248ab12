"""The graph features of a bundle that not every onnxruntime runs, for the manifest's ``runtime`` field.

Each graph is read without its weights; what is looked at is the default-domain opset, every contrib
(com.microsoft) op with the attributes and dtypes whose support arrived in different onnxruntime releases, and
the element type of quantized initializers. The versions those features need live in
:mod:`rsedge.runtime.ort_support` (measured by scripts/ort_versions.py), so the runtime reads the same table.
A contrib op or opset this module does not know fails the export: it has not been measured yet.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from rsedge.runtime.ort_support import FEATURES, summarize

_INT4 = {TensorProto.INT4, TensorProto.UINT4}
_INT8 = {TensorProto.INT8, TensorProto.UINT8}


def _float_dtype(graph: onnx.GraphProto) -> int:
    """The graph's activation dtype: that of its first floating-point input."""
    for vi in graph.input:
        t = vi.type.tensor_type.elem_type
        if t in (TensorProto.FLOAT, TensorProto.FLOAT16):
            return t
    return TensorProto.FLOAT


def graph_features(model: onnx.ModelProto) -> set[str]:
    """Keys of :data:`rsedge.runtime.ort_support.FEATURES` one graph uses; ValueError for an unmeasured one."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    found = {f"opset{opset}"}
    fp16 = _float_dtype(model.graph) == TensorProto.FLOAT16
    init_types = {t.name: t.data_type for t in model.graph.initializer}
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.domain == "com.microsoft":
            if node.op_type == "MatMulNBits":
                found.add(f"matmulnbits-{attrs.get('bits', 4)}")
                if len(node.input) > 5 and node.input[5]:
                    found.add("matmulnbits-bias")
                if fp16:
                    found.add("matmulnbits-fp16")
            elif node.op_type == "GroupQueryAttention":
                found.add("gqa-fp16" if fp16 else "gqa")
                if attrs.get("kv_cache_bit_width") or attrs.get("k_quant_type", b"NONE") not in (b"NONE", "NONE"):
                    found.add("gqa-kv-int8")
            elif node.op_type == "DynamicQuantizeMatMul":
                found.add("dynamic-quantize-matmul")
            elif node.op_type == "RotaryEmbedding":
                found.add("rotary-embedding-fp16" if fp16 else "rotary-embedding")
            elif node.op_type == "SkipSimplifiedLayerNormalization":
                found.add("skip-simplified-layernorm-fp16" if fp16 else "skip-simplified-layernorm")
            else:
                raise ValueError(f"contrib op {node.op_type} has no measured onnxruntime version")
        elif node.domain not in ("", "ai.onnx"):
            raise ValueError(f"op {node.domain}.{node.op_type} has no measured onnxruntime version")
        elif node.op_type in ("DequantizeLinear", "QuantizeLinear"):
            codes = init_types.get(node.input[0])
            found.add("qdq-int4-blocked" if codes in _INT4 else "qdq-int8")
    unknown = sorted(found - set(FEATURES))
    if unknown:
        raise ValueError(f"graph features without a measured onnxruntime version: {unknown}")
    return found


def bundle_runtime(graph_files: Iterable[Path]) -> dict[str, Any]:
    """The manifest's ``runtime`` field for a bundle made of ``graph_files``."""
    features: set[str] = set()
    for path in graph_files:
        features |= graph_features(onnx.load(str(path), load_external_data=False))
    return summarize(features)
