"""A thin layer over ``onnx.helper`` for the hand-built graphs: names, weights, small constants, saving.

Node names are hierarchical (``/model/layers.3/attn/qkv_proj/MatMul``) and values take the name of what
they hold (``/model/layers.3/attn/q``), so a graph viewer or a quantizer's exclusion list reads like the
model. Weights go through a :class:`WeightStore` (external data, stored once); small constants (shapes,
axes, scalars) are embedded in the ``.onnx`` itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper

from rsedge.errors import CheckpointError, OptionError
from rsedge.export.weight_store import ArrayOrFactory, WeightStore
from rsedge.quantize.blockwise import (
    BlockQuantized,
    WeightQuantConfig,
    matmulnbits_tensors,
    qdq_tensors,
    quantize_blockwise,
)

OPSET = 17
IR_VERSION = 8  # the IR of opset 17 (onnx 1.12); TensorRT 8.5's parser reads no newer
QDQ_OPSET = 21  # blocked DequantizeLinear and INT4 (TensorRT >= 10 only)
QDQ_IR_VERSION = 10
PRODUCER = "rsedge"
DTYPES = ("float32", "float16")

Dim = int | str


class QuantPlanLike(Protocol):
    """What the builder asks of a quantization plan, per weight name."""

    def weight_quant(self, name: str) -> WeightQuantConfig | None: ...

    def input_scales(self, name: str, weight_kn: ArrayOrFactory) -> np.ndarray | None: ...


def model_dtype(dtype: str | np.dtype | type) -> np.dtype:
    """The numpy dtype of a graph precision, ``float32`` or ``float16``."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in DTYPES:
        raise OptionError(f"graph dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return dt


def get_weight(weights: Mapping[str, np.ndarray], name: str, shape: Sequence[int]) -> np.ndarray:
    """``weights[name]`` as a numpy array of ``shape``; a missing or misshapen tensor names itself."""
    if name not in weights:
        raise CheckpointError(f"checkpoint lacks the tensor {name!r}")
    arr = np.asarray(weights[name])
    if tuple(arr.shape) != tuple(shape):
        raise CheckpointError(f"tensor {name!r} has shape {list(arr.shape)}, expected {list(shape)}")
    return arr


class GraphBuilder:
    """Collects nodes, I/O and initializers of one graph.

    ``dtype`` is the model precision: :meth:`weight` casts to it, :meth:`to_float`/:meth:`to_model` insert
    the Casts a float16 graph needs around its float32 islands and are no-ops in a float32 graph.
    """

    def __init__(
        self,
        name: str,
        store: WeightStore,
        dtype: str | np.dtype,
        weight_file: str,
        quant: QuantPlanLike | None = None,
        opset: int = OPSET,
    ) -> None:
        self.name = name
        self.opset = opset
        self.quant = quant  # per weight name: its quantization and AWQ input scales; None keeps the model dtype
        self._qdq = False
        self.store = store
        self.dtype = model_dtype(dtype)
        self.elem_type = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.weight_file = weight_file
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._weights: dict[str, TensorProto] = {}
        self._consts: dict[tuple[str, str, bytes], str] = {}
        self._inline: list[TensorProto] = []
        self._scope: list[str] = []
        self._node_names: set[str] = set()
        self._value_names: set[str] = set()

    # -- naming ---------------------------------------------------------------------------------------------

    @contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Nodes and values made inside are named ``/<outer>/<name>/...``."""
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def path(self, local: str) -> str:
        return "/" + "/".join([*self._scope, local])

    @staticmethod
    def _unique(name: str, taken: set[str]) -> str:
        candidate, i = name, 1
        while candidate in taken:
            candidate = f"{name}_{i}"
            i += 1
        taken.add(candidate)
        return candidate

    # -- nodes ----------------------------------------------------------------------------------------------

    def op(
        self,
        op_type: str,
        inputs: Sequence[str],
        *,
        name: str | None = None,
        out: str | Sequence[str] | None = None,
        n_out: int = 1,
        **attrs: object,
    ) -> str | tuple[str, ...]:
        """Add one node; returns its output name (a tuple when it has several).

        ``name`` is the node's local name (default ``op_type``), ``out`` the local name(s) of its outputs
        (default ``<node>_output_<i>``); both are prefixed with the current scope.
        """
        node_name = self._unique(self.path(name or op_type), self._node_names)
        if out is None:
            outs = [f"{node_name}_output_{i}" for i in range(n_out)]
        else:
            outs = [out] if isinstance(out, str) else list(out)
            outs = [self.path(o) if o else "" for o in outs]  # "": an optional output left out
        outs = [self._unique(o, self._value_names) if o else "" for o in outs]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=node_name, **attrs))
        return outs[0] if len(outs) == 1 else tuple(outs)

    def reduce_mean(self, x: str, axes: Sequence[int], *, out: str | None = None) -> str:
        """ReduceMean keeping dims; its axes moved from attribute to input in opset 18."""
        if self.opset >= 18:
            return self.op("ReduceMean", [x, self.ints(list(axes), "reduce_axes")], out=out, keepdims=1)
        return self.op("ReduceMean", [x], out=out, axes=list(axes), keepdims=1)

    def cast(self, x: str, to: np.dtype | type, *, name: str = "Cast", out: str | None = None) -> str:
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(to))
        return self.op("Cast", [x], name=name, out=out, to=elem)

    def to_float(self, x: str, *, name: str = "Cast_to_float") -> str:
        """``x`` in float32: a Cast in a float16 graph, ``x`` itself in a float32 graph."""
        return x if self.dtype == np.float32 else self.cast(x, np.float32, name=name)

    def to_model(self, x: str, *, name: str = "Cast_to_model") -> str:
        """A float32 ``x`` back in the model dtype (no-op in a float32 graph)."""
        return x if self.dtype == np.float32 else self.cast(x, self.dtype, name=name)

    # -- tensors --------------------------------------------------------------------------------------------

    def weight(self, name: str, array: ArrayOrFactory, *, file: str | None = None, cast: bool = True) -> str:
        """An external-data initializer ``name`` (stored once per (file, name)), cast to the model dtype."""
        if name not in self._weights:
            if cast:
                src = array
                array = lambda: np.asarray(src() if callable(src) else src).astype(self.dtype)  # noqa: E731
            proto = self.store.tensor(name, array, file or self.weight_file)
            if cast and proto.data_type != self.elem_type:  # stored earlier by a graph of another precision
                raise ValueError(f"{name!r} is already stored as another dtype than {self.dtype.name}")
            self._weights[name] = proto
        return name

    #   ort:  x --MatMulNBits(codes [N,blocks,blob], scales)--> y
    #   qdq:  codes [K,N] int4/int8 --DequantizeLinear(scales [blocks,N], axis 0)--> W --MatMul(x, W)--> y
    def linear(
        self,
        x: str,
        name: str,
        weight_kn: ArrayOrFactory,
        *,
        file: str | None = None,
        out: str | None = None,
        bias: tuple[str, ArrayOrFactory] | None = None,
    ) -> str:
        """``x @ W (+ b)`` for a [in, out] weight: MatMul, or the quantized form the builder was given.

        ``bias`` is (name, [out] array): MatMulNBits takes it as an input, other forms add it after.
        """
        q = self.quant.weight_quant(name) if self.quant is not None else None
        if q is None or q.form != "ort":
            y = self._linear_unbiased(x, name, weight_kn, q, file, None if bias else out)
            return self.op("Add", [y, self.weight(bias[0], bias[1])], name="Add_bias", out=out) if bias else y
        return self._linear_unbiased(x, name, weight_kn, q, file, out, bias)

    def _linear_unbiased(
        self,
        x: str,
        name: str,
        weight_kn: ArrayOrFactory,
        q: WeightQuantConfig | None,
        file: str | None,
        out: str | None,
        bias: tuple[str, ArrayOrFactory] | None = None,
    ) -> str:
        if q is None:
            return self.op("MatMul", [x, self.weight(name, weight_kn, file=file)], out=out)
        file = file or self.weight_file
        scales = self.quant.input_scales(name, weight_kn)
        if scales is not None:  # AWQ: x / s here, diag(s) W in the quantized weight
            inv = self.weight(f"{name}.awq_inv_scales", (1.0 / scales).astype(np.float32), file=file)
            x = self.op("Mul", [x, inv], name="awq/Mul", out=f"{name}_awq_input")
        bq = self._quantized(name, weight_kn, q, scales)
        if q.form == "qdq" and q.bits == 4 and bq.k % q.block_size:
            # TensorRT infers blocks from shapes and ignores block_size: a ragged last block would be misread.
            raise OptionError(f"{name}: input size {bq.k} is not a multiple of the INT4 block size {q.block_size}")
        if q.form == "ort":
            tensors = matmulnbits_tensors(bq)
            ins = [x, self.weight(f"{name}.q{q.bits}", tensors["B"], file=file, cast=False)]
            ins.append(self.weight(f"{name}.scales", tensors["scales"], file=file))
            if "zero_points" in tensors:
                ins.append(self.weight(f"{name}.zero_points", tensors["zero_points"], file=file, cast=False))
            if bias is not None:  # inputs 3 (zero_points) and 4 (g_idx) are optional
                ins += [""] * (5 - len(ins)) + [self.weight(bias[0], bias[1])]
            return self.op(
                "MatMulNBits",
                ins,
                out=out,
                domain="com.microsoft",
                K=bq.k,
                N=bq.n,
                bits=q.bits,
                block_size=q.block_size,
                accuracy_level=q.accuracy_level,
            )
        self._qdq |= q.bits == 4  # any one blocked INT4 DequantizeLinear needs opset 21, whatever follows
        raw, shape, scales = qdq_tensors(bq)
        codes = f"{name}.q{q.bits}"
        if codes not in self._weights:
            if q.bits == 4:
                self._weights[codes] = self.store.int4_tensor(codes, lambda: raw, shape, file)
            else:
                arr = np.frombuffer(raw, dtype=np.int8).reshape(shape)
                self._weights[codes] = self.store.tensor(codes, arr, file)
        if q.bits == 4:  # blocked along K: opset 21, TensorRT >= 10
            attrs = {"axis": 0, "block_size": q.block_size}
            scale = self.weight(f"{name}.scales", scales, file=file)
        else:  # INT8 per output channel: opset 13 form, which every TensorRT takes
            attrs = {"axis": 1}
            # Before opset 19 DequantizeLinear takes float32 scales only; fp16 graphs cast its output.
            f32 = self.opset < 19
            scale = self.weight(f"{name}.scales", scales.reshape(-1).astype(np.float32), file=file, cast=not f32)
        w = self.op("DequantizeLinear", [codes, scale], name="DequantizeLinear", out=f"{name}_dequantized", **attrs)
        if q.bits == 8 and self.opset < 19:
            w = self.to_model(w, name="Cast_dequantized")
        return self.op("MatMul", [x, w], out=out)

    def _quantized(
        self, name: str, weight_kn: ArrayOrFactory, q: WeightQuantConfig, scales: np.ndarray | None
    ) -> BlockQuantized:
        """Quantize once per bundle: three expert graphs share their attention and lm_head codes."""
        key = ("blockwise", name, q.bits, q.block_size, q.symmetric, q.form, scales is not None)
        if key not in self.store.cache:
            w = np.asarray(weight_kn() if callable(weight_kn) else weight_kn, dtype=np.float32)
            if scales is not None:
                w = w * scales[:, None]
            # The TensorRT INT8 form is per output channel (one block spanning K); the rest is block-wise.
            block = w.shape[0] if (q.form == "qdq" and q.bits == 8) else q.block_size
            self.store.cache[key] = quantize_blockwise(w, q.bits, block, q.symmetric)
            if scales is not None:
                self.store.cache[("awq_scales", name)] = scales
        return self.store.cache[key]

    def const(self, value: object, dtype: np.dtype | type, hint: str) -> str:
        """A small constant embedded in the graph, shared by every use of the same (hint, value)."""
        arr = np.asarray(value, dtype=dtype)
        key = (hint, arr.dtype.name + str(arr.shape), arr.tobytes())
        if key not in self._consts:
            name = self._unique(f"/const/{hint}", self._value_names)
            self._inline.append(
                helper.make_tensor(name, helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape, arr.flatten().tolist())
            )
            self._consts[key] = name
        return self._consts[key]

    def ints(self, values: Sequence[int] | int, hint: str) -> str:
        return self.const(values, np.int64, hint)

    def scalar(self, value: float, hint: str, dtype: np.dtype | type | None = None) -> str:
        """A 0-d constant, by default in the model dtype."""
        return self.const(value, dtype or self.dtype, hint)

    # -- graph I/O ------------------------------------------------------------------------------------------

    def input(self, name: str, elem_type: int, shape: Sequence[Dim]) -> str:
        self._value_names.add(name)
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: Sequence[Dim]) -> str:
        """Declare ``value`` a graph output called ``name`` (renaming it where it is produced and used)."""
        if value != name:
            if name in self._value_names:
                raise ValueError(f"value name {name!r} is already taken")
            for node in self.nodes:
                for seq in (node.input, node.output):
                    for i, v in enumerate(seq):
                        if v == value:
                            seq[i] = name
            self._value_names.add(name)
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    # -- model ----------------------------------------------------------------------------------------------

    def make_model(self, doc_string: str, metadata: Mapping[str, str]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            self.name,
            self.inputs,
            self.outputs,
            initializer=[*self._weights.values(), *self._inline],
            doc_string=doc_string,
        )
        if self._qdq and self.opset < QDQ_OPSET:
            raise ValueError(f"blocked DequantizeLinear needs opset {QDQ_OPSET}; the builder was made for {self.opset}")
        opsets = [helper.make_opsetid("", self.opset)]
        if any(n.domain == "com.microsoft" for n in self.nodes):
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name=PRODUCER, doc_string=doc_string)
        model.ir_version = QDQ_IR_VERSION if self.opset >= QDQ_OPSET else IR_VERSION
        helper.set_model_props(model, {k: str(v) for k, v in metadata.items()})
        return model


def save_graph(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write ``model`` (weights already external, in files beside ``path``) and run the ONNX checker on it."""
    path = Path(path)
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path), full_check=True)  # full: strict shape inference too
    return path
