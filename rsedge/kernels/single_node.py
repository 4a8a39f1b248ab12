"""One GroupQueryAttention node as a model of its own, on onnxruntime's kernel or rsedge's: what the kernel's tests
and its benchmark (scripts/bench_attention_kernel.py) run. Needs the onnx package (the export extra)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

ORT_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class Shape:
    """The attention's heads: Qwen2-0.5B's by default."""

    num_heads: int = 14
    kv_heads: int = 2
    head_size: int = 64
    max_positions: int = 8192


def gqa_model(
    domain: str,
    shape: Shape = Shape(),
    interleaved: int = 0,
    scale: float | None = None,
    kv_scales: tuple[np.ndarray, np.ndarray] | None = None,
) -> bytes:
    """A model of one packed-QKV, rotary GroupQueryAttention node in ``domain`` (inputs qkv, pk, pv, sl, tl, cos,
    sin; outputs out, k, v). ``kv_scales``: an INT8 cache with these key and value scales ([kv * hd]: per channel,
    or [1]), as ``rsedge export --kv-cache int8`` writes it."""
    from onnx import TensorProto, helper, numpy_helper

    attrs: dict[str, Any] = {"num_heads": shape.num_heads, "kv_num_heads": shape.kv_heads, "do_rotary": 1,
                             "rotary_interleaved": interleaved}
    if scale is not None:
        attrs["scale"] = scale
    args, inits = ["qkv", "", "", "pk", "pv", "sl", "tl", "cos", "sin"], []
    if kv_scales is not None:
        kind = "PER_CHANNEL" if kv_scales[0].size > 1 else "PER_TENSOR"
        attrs.update(k_quant_type=kind, v_quant_type=kind, kv_cache_bit_width=8)
        args += ["", "", "", "ks", "vs"]
        pairs = zip(("ks", "vs"), kv_scales, strict=True)
        inits = [numpy_helper.from_array(np.asarray(x, np.float32), n) for n, x in pairs]
    # rsedge's kernel names its int8-cache op apart (see rsedge.kernels.attention_graph)
    op = "GroupQueryAttentionInt8" if kv_scales is not None and domain != ORT_DOMAIN else "GroupQueryAttention"
    node = helper.make_node(op, args, ["out", "k", "v"], domain=domain, **attrs)
    f, hd, kv = TensorProto.FLOAT, shape.head_size, shape.kv_heads
    cache = TensorProto.INT8 if kv_scales is not None else f
    inputs = [
        helper.make_tensor_value_info("qkv", f, ["B", "S", (shape.num_heads + 2 * kv) * hd]),
        helper.make_tensor_value_info("pk", cache, ["B", kv, "P", hd]),
        helper.make_tensor_value_info("pv", cache, ["B", kv, "P", hd]),
        helper.make_tensor_value_info("sl", TensorProto.INT32, ["B"]),
        helper.make_tensor_value_info("tl", TensorProto.INT32, []),
        helper.make_tensor_value_info("cos", f, [shape.max_positions, hd // 2]),
        helper.make_tensor_value_info("sin", f, [shape.max_positions, hd // 2]),
    ]
    outputs = [helper.make_tensor_value_info("out", f, None)]
    outputs += [helper.make_tensor_value_info(n, cache, None) for n in ("k", "v")]
    graph = helper.make_graph([node], "gqa", inputs, outputs, initializer=inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9).SerializeToString()


def session(model: bytes, library: Any = None, threads: int = 2) -> Any:
    """A CPU session of ``model``, with the kernel library registered when given."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = threads, 3
    if library is not None:
        opts.register_custom_ops_library(str(library))
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


class Call:
    """One call's inputs at a depth: ``past`` cached rows, ``new`` tokens, a cache of ``capacity`` rows; ``run()``
    runs the session on them and returns (output, present key, present value). ``shared``: past and present bound
    to one buffer, appended in place, as rsedge's runtime binds them."""

    def __init__(self, sess: Any, shape: Shape, seed: int, past: int, new: int, capacity: int, shared: bool = True,
                 batch: int = 1) -> None:
        rng = np.random.default_rng(seed)
        hd, kv = shape.head_size, shape.kv_heads
        angles = np.arange(shape.max_positions)[:, None] / 10000 ** (np.arange(0, hd, 2) / hd)[None]
        self.sess, self.shared = sess, shared
        int8 = next(i for i in sess.get_inputs() if i.name == "pk").type == "tensor(int8)"
        self.dtype = np.dtype(np.int8 if int8 else np.float32)
        self.pk = np.zeros((batch, kv, capacity, hd), self.dtype)
        self.pv = np.zeros_like(self.pk)
        for buf in (self.pk, self.pv):
            if int8:  # int8 codes; the model's scales (~0.05) make their values those of a float cache
                buf[:, :, :past] = rng.integers(-127, 128, (batch, kv, past, hd))
            else:
                buf[:, :, :past] = rng.standard_normal((batch, kv, past, hd))
        self.feeds = {
            "qkv": rng.standard_normal((batch, new, (shape.num_heads + 2 * kv) * hd)).astype(np.float32),
            "sl": np.full((batch,), past + new - 1, np.int32),
            "tl": np.array(past + new, np.int32),
            "cos": np.cos(angles).astype(np.float32),
            "sin": np.sin(angles).astype(np.float32),
        }
        self.out = np.empty((batch, new, shape.num_heads * hd), np.float32)
        if shared:
            io = sess.io_binding()
            for name, value in self.feeds.items():
                io.bind_cpu_input(name, value)
            for name, buf in (("pk", self.pk), ("pv", self.pv)):
                io.bind_input(name, "cpu", 0, self.dtype, buf.shape, buf.ctypes.data)
            io.bind_output("k", "cpu", 0, self.dtype, self.pk.shape, self.pk.ctypes.data)
            io.bind_output("v", "cpu", 0, self.dtype, self.pv.shape, self.pv.ctypes.data)
            io.bind_output("out", "cpu", 0, np.float32, self.out.shape, self.out.ctypes.data)
            self.io = io

    def run(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.shared:
            out, k, v = self.sess.run(None, {**self.feeds, "pk": self.pk, "pv": self.pv})
            return out, k, v
        self.sess.run_with_iobinding(self.io)  # appends the same rows again each call: timing repeats one step
        return self.out.copy(), self.pk.copy(), self.pv.copy()
