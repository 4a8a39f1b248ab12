"""Static check of what TensorRT's ONNX parser (onnx-tensorrt) takes, per TensorRT version and JetPack target.

TensorRT cannot run here, so this reads a bundle's graphs (never their external weights) and compares every node,
initializer type, Q/DQ layout and the opset/IR versions with the parser's published support tables. Each fact
below names its source; what could not be sourced is marked "unverified" and never blocks a graph.

Severity: "error" (the parser or builder rejects it, or it builds a wrong engine), "warning" (accepted, with a
caveat the runtime must know), "unverified" (no stored source says either way).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from rsedge.errors import BundleError, OptionError
from rsedge.runtime import forms

# JetPack -> TensorRT (shared/docs/edge-targets.md, section 4: JP 5.1 = 8.5.2, JP 6.0 = 8.6.2, JP 6.1/6.2 = 10.3).
JETPACK_TARGETS = {"jp5.1": "8.5", "jp6.0": "8.6", "jp6.1": "10.3", "jp6.2": "10.3"}

ERROR, WARNING, UNVERIFIED = "error", "warning", "unverified"


@dataclass(frozen=True)
class Issue:
    """One finding about one node (or the graph as a whole: node "<graph>")."""

    node: str
    op_type: str
    reason: str
    severity: str = ERROR


@dataclass(frozen=True)
class TrtTable:
    """What one TensorRT release's ONNX parser documents."""

    version: str
    source: str
    opset_max: int  # documented ("up to" / "inclusive range")
    opset_min: int | None  # documented lower bound (10.x: 9); None where the doc names none
    opset_tolerated: int  # highest opset that is a warning, not an error (see _TOLERATED_OPSET_WHY)
    onnx_ir: int | None  # IR version of the ONNX release the parser was built against; None: unverified
    dtypes: frozenset[str]  # TensorRT data types the doc lists
    supported: frozenset[str]
    unsupported: frozenset[str]
    unverified_ops: frozenset[str] = frozenset()
    types: Mapping[str, frozenset[str]] = field(default_factory=dict)  # per op we emit: the types it takes
    restrictions: Mapping[str, str] = field(default_factory=dict)
    int64_cast_down: bool = False  # INT64 silently cast to INT32 (and I/O bindings are INT32)
    reconstructed: bool = False  # op table rebuilt from neighbouring docs + the changelog, not read directly


def _ops(text: str) -> frozenset[str]:
    return frozenset(text.split())


def _types(**rows: str) -> dict[str, frozenset[str]]:
    return {op: frozenset(t.replace(",", " ").split()) for op, t in rows.items()}


# ---------------------------------------------------------------------------------------------------------------
# TensorRT 8.5 (JetPack 5.1: 8.5.2)
# Source: onnx/onnx-tensorrt docs/operators.md @ 6d0ab7be324d02c7feb3a306b6fdbeae84f71ddc,
#   "TensorRT 8.5 supports operators up to Opset 17."
#   "TensorRT supports the following ONNX data types: DOUBLE, FLOAT32, FLOAT16, INT8, and BOOL"
#   "There is limited support for INT32, INT64, and DOUBLE types. TensorRT will attempt to cast down INT64 to INT32"
# (A second stored 8.5 table, @ 0f305925c58b7358ea5caa308b41faed803382a5, marks HardSwish, Mod and OneHot "N";
#  it differs in no operator rsedge emits.)
_OPS_85_Y = _ops(
    """Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip
    Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout
    Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm GlobalAveragePool
    GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GRU HardSwish HardSigmoid Identity If ImageScaler
    InstanceNormalization IsNaN LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul
    Max MaxPool Mean MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
    Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
    ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements
    ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
    Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor"""
)
_OPS_85_N = _ops(
    """Bernoulli BitShift BlackmanWindow Compress ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear
    HammingWindow HannWindow Hardmax IsInf LayerNormalization MatMulInteger MaxRoiPool MaxUnpool MelWeightMatrix
    Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv QLinearMatMul STFT
    SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength SequenceMap
    SoftmaxCrossEntropyLoss SplitToSequence StringNormalizer TfIdfVectorizer Unique"""
)
# "Supported Types" of the 8.5 rows for the operators rsedge's graphs use (same source).
_TYPES_85 = _types(
    Add="FP32,FP16,INT32", Cast="FP32,FP16,INT32,INT8,BOOL", Concat="FP32,FP16,INT32,INT8,BOOL",
    Conv="FP32,FP16,INT8", Cos="FP32,FP16", DequantizeLinear="INT8", Div="FP32,FP16,INT32", Erf="FP32,FP16",
    Gemm="FP32,FP16,INT8", Less="FP32,FP16,INT32", MatMul="FP32,FP16", Mul="FP32,FP16,INT32",
    Neg="FP32,FP16,INT32", Pow="FP32,FP16", Range="FP32,FP16,INT32", ReduceMean="FP32,FP16",
    Reshape="FP32,FP16,INT32,INT8,BOOL", Shape="FP32,FP16,INT32,INT8,BOOL", Sigmoid="FP32,FP16,INT8",
    Sin="FP32,FP16", Slice="FP32,FP16,INT32,INT8,BOOL", Softmax="FP32,FP16", Split="FP32,FP16,INT32,BOOL",
    Sqrt="FP32,FP16", Squeeze="FP32,FP16,INT32,INT8,BOOL", Sub="FP32,FP16,INT32", Tanh="FP32,FP16,INT8",
    Tile="FP32,FP16,INT32,BOOL", Transpose="FP32,FP16,INT32,INT8,BOOL", Unsqueeze="FP32,FP16,INT32,INT8,BOOL",
    Where="FP32,FP16,INT32,BOOL",
)  # fmt: skip
_RESTRICT_8X = {
    "Slice": "`axes` must be an initializer",
    "Squeeze": "`axes` must be an initializer",
    "Unsqueeze": "`axes` must be a constant tensor",
    "DequantizeLinear": "`x_zero_point` must be zero",
    "QuantizeLinear": "`y_zero_point` must be 0",
}

# ---------------------------------------------------------------------------------------------------------------
# TensorRT 8.6 (JetPack 6.0: 8.6.2)
# Source: onnx/onnx-tensorrt docs/operators.md @ 66b2536545b89bf1388c8255a366cad14eff952a,
#   "TensorRT 8.6 supports operators up to Opset 17."; data types "DOUBLE, FLOAT32, FLOAT16, INT8, and BOOL".
# Changelog (docs/Changelog.md @ 0137504e2b25fe5253bd85d26b073378fb67805b), 8.6 EA: "Added support for
#   GroupNormalization, LayerNormalization, IsInf operations"; 9.0 EA: "Added support for INT64 data type ... prior
#   to this release, such models required INT32 bindings" (so 8.x still casts INT64 to INT32).
_OPS_86_Y = _OPS_85_Y | _ops("GroupNormalization IsInf LayerNormalization")
_OPS_86_N = _OPS_85_N - _ops("IsInf LayerNormalization")
_TYPES_86 = {
    **_TYPES_85,
    **_types(
        Add="FP32,FP16,INT32,INT64", Cast="FP32,FP16,INT32,INT64,INT8,UINT8,BOOL",
        Concat="FP32,FP16,INT32,INT64,INT8,BOOL", Div="FP32,FP16,INT32,INT64", LayerNormalization="FP32,FP16",
        Less="FP32,FP16,INT32,INT64", Mul="FP32,FP16,INT32,INT64", Neg="FP32,FP16,INT32,INT64",
        Range="FP32,FP16,INT32,INT64", Reshape="FP32,FP16,INT32,INT64,INT8,BOOL",
        Shape="FP32,FP16,INT32,INT64,INT8,BOOL", Slice="FP32,FP16,INT32,INT64,INT8,BOOL",
        Split="FP32,FP16,INT32,INT64,BOOL", Squeeze="FP32,FP16,INT32,INT64,INT8,BOOL", Sub="FP32,FP16,INT32,INT64",
        Tile="FP32,FP16,INT32,INT64,BOOL", Transpose="FP32,FP16,INT32,INT64,INT8,BOOL",
        Unsqueeze="FP32,FP16,INT32,INT64,INT8,BOOL", Where="FP32,FP16,INT32,INT64,BOOL",
    ),
}  # fmt: skip

# ---------------------------------------------------------------------------------------------------------------
# TensorRT 10.6 (no JetPack; the nearest stored 10.x table after 10.0, basis of the 10.0/10.3 reconstruction)
# Source: onnx/onnx-tensorrt docs/operators.md @ 0137504e2b25fe5253bd85d26b073378fb67805b,
#   "TensorRT 10.6 supports operators in the inclusive range of opset 9 to opset 22."
#   data types "DOUBLE, FLOAT32, FLOAT16, BFLOAT16, INT32, INT64, FP8, INT8, INT4, UINT8, and BOOL";
#   "INT8, INT4, and FP8 are treated as `Quantized Types` ... available only through quantization";
#   "UINT8 is only supported as network input or output tensor types."
_OPS_106_Y = _OPS_86_Y | _ops("BlackmanWindow CastLike DeformConv Gelu HammingWindow HannWindow Hardmax Mish STFT")
_OPS_106_N = (_OPS_86_N - _ops("BlackmanWindow HammingWindow HannWindow Hardmax STFT")) | _ops(
    """AffineGrid BitwiseAnd BitwiseNot BitwiseOr BitwiseXor Col2Im CenterCropPad ImageDecoder RegexFullMatch
    StringConcat StringSplit"""
)
_TYPES_10X = _types(
    Add="FP32,FP16,BF16,INT32,INT64", Cast="FP32,FP16,BF16,INT32,INT64,UINT8,BOOL",
    Concat="FP32,FP16,BF16,INT32,INT64,BOOL", Conv="FP32,FP16,BF16", Cos="FP32,FP16,BF16",
    DequantizeLinear="INT8,FP8,INT4", Div="FP32,FP16,BF16,INT32,INT64", Erf="FP32,FP16,BF16",
    Gemm="FP32,FP16,BF16", LayerNormalization="FP32,FP16,BF16", Less="FP32,FP16,BF16,INT32,INT64",
    MatMul="FP32,FP16,BF16", Mul="FP32,FP16,BF16,INT32,INT64", Neg="FP32,FP16,BF16,INT32,INT64",
    Pow="FP32,FP16,BF16", Range="FP32,FP16,BF16,INT32,INT64", ReduceMean="FP32,FP16,BF16,INT32,INT64",
    Reshape="FP32,FP16,BF16,INT32,INT64,BOOL", Shape="FP32,FP16,BF16,INT32,INT64,BOOL", Sigmoid="FP32,FP16,BF16",
    Sin="FP32,FP16,BF16", Slice="FP32,FP16,BF16,INT32,INT64,BOOL", Softmax="FP32,FP16,BF16",
    Split="FP32,FP16,BF16,INT32,INT64,BOOL", Sqrt="FP32,FP16,BF16", Squeeze="FP32,FP16,BF16,INT32,INT64,BOOL",
    Sub="FP32,FP16,BF16,INT32,INT64", Tanh="FP32,FP16,BF16", Tile="FP32,FP16,BF16,INT32,INT64,BOOL",
    Transpose="FP32,FP16,BF16,INT32,INT64,BOOL", Unsqueeze="FP32,FP16,BF16,INT32,INT64,BOOL",
    Where="FP32,FP16,BF16,INT32,INT64,BOOL",
)  # fmt: skip
_RESTRICT_10X = {
    "Squeeze": "`axes` must be an initializer",
    "Unsqueeze": "`axes` must be a constant tensor",
    "ReduceMean": "`axes` must be an initializer",
    "LayerNormalization": "Only the first output `Y` is supported.",
    "DequantizeLinear": "`x_zero_point` must be zero",
    "QuantizeLinear": "`y_zero_point` must be 0",
}

# ---------------------------------------------------------------------------------------------------------------
# TensorRT 10.0 -- RECONSTRUCTED. The stored 10.0 docs/operators.md was reachable only through code search (its
# commit could not be resolved), which showed its header: "TensorRT 10.0 supports operators in the inclusive range
# of opset 9 to opset 20." and data types "DOUBLE, FLOAT32, FLOAT16, BFLOAT16, INT32, INT64, FP8, INT8, INT4,
# UINT8, and BOOL". Changelog 10.0 EA: "Added support for `INT4` quantization". Op table = 10.6's minus what the
# changelog says arrived later: DeformConv (10.1), BlackmanWindow/HammingWindow/HannWindow (10.4), STFT (10.5).
# Gelu and Mish are absent from the 9.1 table (@ 877b5dccf5779d7d7dfa0c45b9c11cbee3b285ce, opset up to 19) and
# present in 10.6; when they arrived is unverified. Slice `axes` must be an initializer until 10.3 (9.1 table;
# changelog 10.3 GA: "Added support for tensor `axes` inputs for `Slice` nodes").
_OPS_100_Y = _OPS_106_Y - _ops("DeformConv BlackmanWindow HammingWindow HannWindow STFT Gelu Mish")
_OPS_100_N = _OPS_106_N | _ops("BlackmanWindow HammingWindow HannWindow STFT")
# TensorRT 10.3 (JetPack 6.1/6.2) -- RECONSTRUCTED the same way (no 10.3 operators.md is stored): 10.0 + DeformConv
# (10.1 GA). Its documented opset maximum is unverified: 10.0 says 20 and 10.6 says 22; 20 is assumed.
_OPS_103_Y = _OPS_100_Y | _ops("DeformConv")

# ---------------------------------------------------------------------------------------------------------------
# TensorRT 10.15 (the newest 10.x table stored)
# Source: onnx/onnx-tensorrt docs/operators.md @ fa5aa9f61e7781d2ca8f5351d42c1f19525a6124,
#   "TensorRT 10.15 supports operators in the inclusive range of opset 9 to opset 24."
#   data types "DOUBLE, FLOAT32, FLOAT16, BFLOAT16, FP8, FP4, INT32, INT64, INT8, INT4, UINT8, and BOOL".
#   Squeeze/Unsqueeze: "`axes` must be resolvable to a constant."; DequantizeLinear: INT8, FP8, FP4, INT4.
# Intermediate tables read: 10.8 @ 554c9f1b7fc048e39e3afe0c2af757902eb7b23e (opset 9-22), 10.12 @
# 4df1996807d844029e7aabefd54619af99f288f8 (opset 9-23). TensorRT 11.0 (@ 2f3fa349247d9ff52d7662cb995c82278df31a86)
# documents opset 9-24 as well.
_OPS_1015_Y = _OPS_106_Y | _ops("Attention RMSNormalization RotaryEmbedding TensorScatter")
_TYPES_1015 = {
    **_TYPES_10X,
    **_types(DequantizeLinear="INT8,FP8,FP4,INT4", Pow="FP32,FP16,BF16,INT32,INT64"),
}
_RESTRICT_1015 = {
    **_RESTRICT_10X,
    "Squeeze": "`axes` must be resolvable to a constant.",
    "Unsqueeze": "`axes` must be resolvable to a constant.",
}

_DT_8X = frozenset({"DOUBLE", "FP32", "FP16", "INT8", "BOOL", "INT32", "INT64"})  # INT32/INT64 "limited"
_DT_10 = frozenset({"DOUBLE", "FP32", "FP16", "BF16", "INT32", "INT64", "FP8", "INT8", "INT4", "UINT8", "BOOL"})

# Opset above the documented maximum: onnx-tensorrt's ModelImporter only warns for opset < 7 and never rejects a
# newer opset (ModelImporter.cpp, all stored versions), so a newer opset is imported with the importers it has.
# For 8.x that is an error: opset 18 moved ReduceMean's axes and Split's sizes to inputs, which 8.x importers read
# from attributes. For 10.0/10.3 opset 21 is tolerated (warning): INT4 weights (changelog 10.0 EA) exist in ONNX
# only as opset-21 blocked DequantizeLinear, and NVIDIA's ModelOpt INT4 ONNX output (opset 21) targets TRT >= 10.0
# (edge-targets.md, ModelOpt row).
_TOLERATED_OPSET_WHY = (
    "ModelImporter only warns below opset 7; TRT >= 10.0 takes INT4, which ONNX has only as opset-21 DequantizeLinear"
)

TABLES: dict[str, TrtTable] = {
    "8.5": TrtTable(
        "8.5", "onnx/onnx-tensorrt docs/operators.md @6d0ab7be (8.5: up to Opset 17)", 17, None, 17, 8,
        _DT_8X, _OPS_85_Y, _OPS_85_N, types=_TYPES_85, restrictions=_RESTRICT_8X, int64_cast_down=True,
    ),
    "8.6": TrtTable(
        "8.6", "onnx/onnx-tensorrt docs/operators.md @66b25365 (8.6: up to Opset 17)", 17, None, 17, 8,
        _DT_8X, _OPS_86_Y, _OPS_86_N, types=_TYPES_86, restrictions=_RESTRICT_8X, int64_cast_down=True,
    ),
    "10.0": TrtTable(
        "10.0", "onnx/onnx-tensorrt docs/operators.md 10.0 header (opset 9-20) + 10.6 table + Changelog", 20, 9, 21,
        None, _DT_10, _OPS_100_Y, _OPS_100_N, _ops("Gelu Mish"), _TYPES_10X,
        {**_RESTRICT_10X, "Slice": "`axes` must be an initializer"}, reconstructed=True,
    ),
    "10.3": TrtTable(
        "10.3", "reconstructed: 10.0 header + 10.6 table @0137504e + Changelog (10.3 opset max unverified)", 20, 9,
        21, None, _DT_10, _OPS_103_Y, _OPS_100_N, _ops("Gelu Mish"), _TYPES_10X, _RESTRICT_10X, reconstructed=True,
    ),
    "10.15": TrtTable(
        "10.15", "onnx/onnx-tensorrt docs/operators.md @fa5aa9f6 (10.15: opset 9-24)", 24, 9, 24, 10,
        _DT_10 | {"FP4"}, _OPS_1015_Y, _OPS_106_N, types=_TYPES_1015, restrictions=_RESTRICT_1015,
    ),
}  # fmt: skip
# IR versions (onnx_ir): the ONNX submodule each parser was built against, from docs/Changelog.md: "TensorRT 22.08
# Release ... Updated ONNX submodule version to 1.12" (before 8.5 GA, which names no update: IR 8, inferred);
# 8.6 GA "Updated ONNX submodule to v1.13.1" (IR 8); 9.0 EA "Updated ONNX submodule to v1.14.0" (IR 9); 10.6 GA
# "Updated ONNX submodule version to 1.17.0" (IR 10). 10.0-10.5 unverified (>= 1.14). A newer IR only makes the
# onnx2trt/trtexec front end print "ONNX model has a newer ir_version ... than this parser was built against".

# INT4 (and blocked DequantizeLinear at all) from TRT 10.0: changelog 10.0 EA; Dequantize operator doc
# (docs.nvidia.com/deeplearning/tensorrt/operators/docs/Dequantize.html): scale "must be a build-time constant ...
# a 2-D tensor for block quantization (supported for DataType::kINT4 only)"; quantized-types-schemes.html (latest):
# "INT4 quantization requires per-block scales. The supported block sizes are {64, 128}. The block dimension should
# be one of the last two dimensions. TensorRT only supports INT4 for weight quantization". The parser infers the block
# from shapes, not the block_size attribute (onnxOpImporters.cpp, Q/DQ helper: "Only a single blocking dimension is
# allowed", "Inferred block size is not an integer", "4-bit quantization requies an even number of elements").
INT4_MIN_VERSION = (10, 0)
INT4_BLOCK_SIZES = (64, 128)

_ONNX_TO_TRT = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.DOUBLE: "DOUBLE",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.INT8: "INT8",
    TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL",
    TensorProto.INT4: "INT4",
    TensorProto.UINT4: "UINT4",
    TensorProto.FLOAT8E4M3FN: "FP8",
    TensorProto.FLOAT8E4M3FNUZ: "FP8E4M3FNUZ",
    TensorProto.FLOAT8E5M2: "FP8E5M2",
    TensorProto.FLOAT8E5M2FNUZ: "FP8E5M2FNUZ",
}
if hasattr(TensorProto, "FLOAT4E2M1"):  # onnx >= 1.18
    _ONNX_TO_TRT[TensorProto.FLOAT4E2M1] = "FP4"

GRAPH = "<graph>"


def _vtuple(version: str) -> tuple[int, int]:
    major, minor = [*version.split("."), "0"][:2]
    return int(major), int(minor)


def resolve_version(target: str) -> str:
    """A table key from a JetPack target ("jp6.1"), a TensorRT version ("10.3", "8.5.2") or "latest" (10.15)."""
    t = str(target).strip().lower()
    t = JETPACK_TARGETS.get(t, t)
    if t in ("latest", "current"):
        return "10.15"
    if t in TABLES:
        return t
    parts = t.split(".")
    if len(parts) >= 2 and ".".join(parts[:2]) in TABLES:
        return ".".join(parts[:2])
    known = ", ".join([*JETPACK_TARGETS, *TABLES])
    raise OptionError(f"no TensorRT support table for {target!r}; known targets: {known}")


def _dtype_name(elem_type: int) -> str:
    return _ONNX_TO_TRT.get(elem_type, TensorProto.DataType.Name(elem_type) if elem_type else "UNDEFINED")


def _load(model_or_path: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, Path | None]:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, None
    path = Path(model_or_path)
    if not path.is_file():
        raise BundleError(f"{path}: no such ONNX file")
    # Weights stay on disk: a 1B-parameter bundle is checked in milliseconds and without its RAM.
    return onnx.load(str(path), load_external_data=False), path.parent


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    """elem_type of every value shape inference can name (inputs, initializers, intermediates)."""
    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # a graph the checker cannot type is still checked op by op
        inferred = model
    g = inferred.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    return types


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def check_graph(onnx_path_or_model: str | Path | onnx.ModelProto, trt_version: str) -> list[Issue]:
    """Everything in one graph that TensorRT ``trt_version`` (or a JetPack target name) would reject or warn about."""
    table = TABLES[resolve_version(trt_version)]
    v = _vtuple(table.version)
    model, folder = _load(onnx_path_or_model)
    issues: list[Issue] = []
    issues += _check_versions(model, table)
    inits = {t.name: t for t in model.graph.initializer}
    constants = set(inits) | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    issues += _check_initializers(model, table, v, folder)
    issues += _check_io(model, table)
    types = _value_types(model)
    for node in model.graph.node:
        issues += _check_node(node, table, v, types, inits, constants)
    return issues


def _check_versions(model: onnx.ModelProto, table: TrtTable) -> list[Issue]:
    out: list[Issue] = []
    opset = _default_opset(model)
    trt = f"TensorRT {table.version}"
    if opset > table.opset_tolerated:
        out.append(
            Issue(GRAPH, "opset", f"opset {opset} is above opset {table.opset_max}, the highest {trt} documents "
                  f"({table.source}); its importers predate the newer operator forms")
        )  # fmt: skip
    elif opset > table.opset_max:
        out.append(
            Issue(GRAPH, "opset", f"opset {opset} is above the documented opset {table.opset_max} of {trt}; "
                  f"tolerated ({_TOLERATED_OPSET_WHY})", WARNING)
        )  # fmt: skip
    if opset < 7 or (table.opset_min is not None and opset < table.opset_min):
        out.append(Issue(GRAPH, "opset", f"opset {opset} is below what {trt} supports officially", WARNING))
    ir = int(model.ir_version)
    if table.onnx_ir is None:
        if ir > 9:  # 10.0-10.5 were built against ONNX >= 1.14 (IR 9); the exact release is not sourced
            out.append(
                Issue(
                    GRAPH,
                    "ir_version",
                    f"IR version {ir}: the ONNX release {trt}'s parser was built "
                    "against is unverified (>= 1.14, IR 9); a newer IR only draws a warning",
                    UNVERIFIED,
                )
            )
    elif ir > table.onnx_ir:
        out.append(Issue(GRAPH, "ir_version", f"IR version {ir} is newer than the IR {table.onnx_ir} {trt}'s parser "
                         "was built against; it is parsed, with a 'newer ir_version' warning", WARNING))  # fmt: skip
    return out


def _check_initializers(
    model: onnx.ModelProto, table: TrtTable, v: tuple[int, int], folder: Path | None
) -> list[Issue]:
    out: list[Issue] = []
    missing: set[str] = set()
    for t in model.graph.initializer:
        dt = _dtype_name(t.data_type)
        if dt == "INT4" and v < INT4_MIN_VERSION:
            out.append(Issue(t.name, "initializer", f"INT4 weights need TensorRT >= 10.0 (changelog 10.0 EA), not "
                             f"{table.version}"))  # fmt: skip
        elif dt == "UINT8":
            out.append(Issue(t.name, "initializer", "UINT8 tensors are only network inputs/outputs in TensorRT "
                             "(operators.md); this is a packed weight blob of an onnxruntime-only op"))  # fmt: skip
        elif dt not in table.dtypes:
            out.append(Issue(t.name, "initializer", f"data type {dt} is not a TensorRT {table.version} type"))
        if folder is not None and t.data_location == TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc and loc not in missing and not (folder / loc).is_file():
                missing.add(loc)
                out.append(Issue(t.name, "initializer", f"external data file {loc} is missing; the parser reads it"))
    return out


def _check_io(model: onnx.ModelProto, table: TrtTable) -> list[Issue]:
    if not table.int64_cast_down:
        return []
    return [
        Issue(vi.name, "graph input" if vi in model.graph.input else "graph output",
              f"INT64 is cast to INT32 by TensorRT {table.version}: bind this tensor as int32 (changelog 9.0 EA)",
              WARNING)
        for vi in [*model.graph.input, *model.graph.output]
        if vi.type.tensor_type.elem_type == TensorProto.INT64
    ]  # fmt: skip


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _check_node(
    node: onnx.NodeProto,
    table: TrtTable,
    v: tuple[int, int],
    types: Mapping[str, int],
    inits: Mapping[str, TensorProto],
    constants: set[str],
) -> list[Issue]:
    name, op = node.name or f"<{node.op_type}>", node.op_type
    trt = f"TensorRT {table.version}"
    if node.domain not in ("", "ai.onnx"):
        return [Issue(name, f"{node.domain}::{op}", f"custom domain {node.domain!r}: onnx-tensorrt imports ai.onnx "
                      f"operators only (and plugins by name); {trt} has no {op}")]  # fmt: skip
    if op in table.unverified_ops:
        return [Issue(name, op, f"whether {trt} imports {op} is unverified (reconstructed table)", UNVERIFIED)]
    if op in table.unsupported:
        return [Issue(name, op, f"{op} is not supported by {trt} ({table.source}: 'N')")]
    if op not in table.supported:
        sev = UNVERIFIED if table.reconstructed else ERROR
        return [Issue(name, op, f"{op} is not in {trt}'s operator table", sev)]
    out: list[Issue] = []

    def input_type(i: int) -> str | None:
        if i >= len(node.input) or not node.input[i] or node.input[i] not in types:
            return None
        dt = _dtype_name(types[node.input[i]])
        if table.int64_cast_down:  # 8.x casts these down before any layer sees them (operators.md note)
            dt = {"INT64": "INT32", "DOUBLE": "FP32"}.get(dt, dt)
        return dt

    allowed = table.types.get(op)
    if allowed is not None and op != "DequantizeLinear":
        dt = input_type(1 if op == "Where" else 0)
        if dt is not None and dt not in allowed:
            out.append(Issue(name, op, f"{op} on {dt}: {trt} lists {', '.join(sorted(allowed))}"))
        if op == "Cast":
            to = _dtype_name(int(_attr(node, "to", 0)))
            to = {"INT64": "INT32", "DOUBLE": "FP32"}.get(to, to) if table.int64_cast_down else to
            if to not in allowed:
                out.append(Issue(name, op, f"Cast to {to}: {trt} lists {', '.join(sorted(allowed))}"))

    axes_input = {"Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "ReduceMean": 1}.get(op)
    if axes_input is not None and op in table.restrictions and len(node.input) > axes_input:
        axes = node.input[axes_input]
        if axes and axes not in constants:
            # "resolvable to a constant" (10.8+) may also fold a computed value: a warning there, an error before.
            sev = WARNING if "resolvable" in table.restrictions[op] else ERROR
            out.append(Issue(name, op, f"{op} axes {axes!r} is computed: {table.restrictions[op]}", sev))

    if op == "LayerNormalization" and sum(1 for o in node.output if o) > 1 and op in table.restrictions:
        out.append(Issue(name, op, f"LayerNormalization has {len(node.output)} outputs: {table.restrictions[op]}"))

    if op in ("DequantizeLinear", "QuantizeLinear"):
        out += _check_qdq(node, name, table, v, types, inits, constants, input_type)
    return out


def _check_qdq(
    node: onnx.NodeProto,
    name: str,
    table: TrtTable,
    v: tuple[int, int],
    types: Mapping[str, int],
    inits: Mapping[str, TensorProto],
    constants: set[str],
    input_type,
) -> list[Issue]:
    op, trt = node.op_type, f"TensorRT {table.version}"
    out: list[Issue] = []
    if len(node.input) > 1 and node.input[1] not in constants:
        out.append(Issue(name, op, "the scale must be a build-time constant (TRT Dequantize operator doc)"))
    if len(node.input) > 2 and node.input[2]:
        zp = inits.get(node.input[2])
        if zp is None:
            out.append(Issue(name, op, "zero point is not an initializer; TensorRT needs it constant and zero"))
        elif zp.data_location == TensorProto.EXTERNAL:
            out.append(Issue(name, op, "zero point lives in external data: that it is all zero is unverified",
                             UNVERIFIED))  # fmt: skip
        elif onnx.numpy_helper.to_array(zp).any():
            out.append(Issue(name, op, f"{table.restrictions.get(op, 'zero point must be zero')} (symmetric only)"))
    if op != "DequantizeLinear":
        return out
    x = node.input[0]
    xdt = input_type(0)
    allowed = table.types.get(op, frozenset())
    if xdt is not None and xdt not in allowed:
        why = " (INT4 from TensorRT 10.0)" if xdt == "INT4" else ""
        out.append(Issue(name, op, f"DequantizeLinear of {xdt}: {trt} lists {', '.join(sorted(allowed))}{why}"))
    if xdt == "INT4" and x not in inits:
        out.append(Issue(name, op, "INT4 is weight-only in TensorRT: the quantized input must be an initializer"))
    block = int(_attr(node, "block_size", 0) or 0)
    xt = inits.get(x)
    scale = inits.get(node.input[1]) if len(node.input) > 1 else None
    if block == 0:
        if scale is not None and len(scale.dims) >= 2 and _numel(scale.dims) > 1:
            out.append(Issue(name, op, "scale of rank >= 2 without block_size: TensorRT takes scalar/1-D/blocked only"))
        return out
    if v < INT4_MIN_VERSION:
        out.append(Issue(name, op, f"blocked DequantizeLinear (block_size={block}, opset 21) needs TensorRT >= 10.0"))
    if xdt is not None and xdt != "INT4":
        out.append(Issue(name, op, f"block quantization is INT4-only in TensorRT; this block-quantizes {xdt}"))
    if block not in INT4_BLOCK_SIZES:
        out.append(Issue(name, op, f"block size {block}: TensorRT supports INT4 block sizes "
                         f"{' and '.join(map(str, INT4_BLOCK_SIZES))} only"))  # fmt: skip
    if xt is not None:
        dims, rank = list(xt.dims), len(xt.dims)
        axis = int(_attr(node, "axis", 1))
        axis = axis + rank if axis < 0 else axis
        if rank < 2 or axis not in (rank - 1, rank - 2):
            out.append(Issue(name, op, f"blocked axis {axis} of a rank-{rank} weight: TensorRT blocks one of the "
                             "last two dimensions"))  # fmt: skip
        elif dims[axis] % block:
            out.append(Issue(name, op, f"dimension {dims[axis]} is not a multiple of block {block}: TensorRT infers "
                             "the block as dim // scale_dim and would dequantize with the wrong blocks"))  # fmt: skip
        if scale is not None and len(scale.dims) == rank:
            want = [-(-d // block) if i == axis else d for i, d in enumerate(dims)]
            if list(scale.dims) != want:
                out.append(Issue(name, op, f"scale shape {list(scale.dims)} does not match weight {dims} blocked by "
                                 f"{block} on axis {axis} (expected {want})"))  # fmt: skip
        if xdt == "INT4" and _numel(dims) % 2:
            out.append(Issue(name, op, "4-bit weights need an even number of elements (onnx-tensorrt Q/DQ importer)"))
    return out


def _numel(dims: Iterable[int]) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def passes(issues: Iterable[Issue]) -> bool:
    """True when nothing is an error (warnings and unverified points do not block)."""
    return not any(i.severity == ERROR for i in issues)


def bundle_graph_files(manifest: Mapping) -> list[str]:
    """The ONNX files a bundle manifest names: vision, then every expert's decoder."""
    graphs = manifest.get("graphs", {})
    files = [graphs["vision"]["file"]] if "vision" in graphs else []
    experts = graphs.get("decoder", {}).get("experts", {})
    files += [experts[k]["file"] for k in sorted(experts, key=int)]
    return files


def check_bundle(bundle_dir: str | Path, target: str) -> dict[str, list[Issue]]:
    """check_graph for every graph of a bundle; ``target`` is a JetPack name or a TensorRT version. A bundle that
    carries two decoder forms is checked in the one TensorRT runs (the qdq form)."""
    root = Path(bundle_dir)
    mpath = root / "manifest.json"
    if not mpath.is_file():
        raise BundleError(f"{root}: not a bundle (no manifest.json)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath}: unreadable manifest ({e})") from None
    form = forms.form_for_device(manifest, "tensorrt") if isinstance(manifest, dict) else None
    return check_manifest(root, manifest if form is None else forms.form_manifest(manifest, form), target)


def check_manifest(root: str | Path, manifest: Mapping, target: str) -> dict[str, list[Issue]]:
    """check_graph for every graph ``manifest`` names (one form's), the files read from ``root``."""
    return {f: check_graph(Path(root) / f, target) for f in bundle_graph_files(manifest)}


def format_report(
    results: Mapping[str, list[Issue]], target: str, show: Iterable[str] = (ERROR, WARNING, UNVERIFIED)
) -> str:
    """Human-readable report of check_bundle's result; identical findings on many nodes are folded into one line."""
    version = resolve_version(target)
    table = TABLES[version]
    ok = all(passes(issues) for issues in results.values())
    head = f"{target}" + (f" (TensorRT {version})" if target.lower() in JETPACK_TARGETS else "")
    lines = [f"{head}: {'PASS' if ok else 'FAIL'}" + (" [reconstructed op table]" if table.reconstructed else "")]
    show = set(show)
    for graph, issues in results.items():
        count = Counter(i.severity for i in issues)
        summary = ", ".join(f"{s} {count[s]}" for s in (ERROR, WARNING, UNVERIFIED))
        lines.append(f"  {graph}: {'ok' if passes(issues) else 'REJECTED'} ({summary})")
        folded: dict[tuple[str, str, str], list[str]] = {}
        for i in issues:
            if i.severity in show:
                folded.setdefault((i.severity, i.op_type, i.reason), []).append(i.node)
        for (sev, op, reason), nodes in folded.items():
            where = nodes[0] if len(nodes) == 1 else f"{nodes[0]} and {len(nodes) - 1} more"
            lines.append(f"    {sev:<10} {op}: {reason} [{where}]")
    return "\n".join(lines)
