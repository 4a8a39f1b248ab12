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


def gqa_model(domain: str, shape: Shape = Shape(), interleaved: int = 0, scale: float | None = None) -> bytes:
    """A model of one packed-QKV, rotary GroupQueryAttention node in ``domain`` (inputs qkv, pk, pv, sl, tl, cos,
    sin; outputs out, k, v)."""
    from onnx import TensorProto, helper

    attrs: dict[str, Any] = {"num_heads": shape.num_heads, "kv_num_heads": shape.kv_heads, "do_rotary": 1,
                             "rotary_interleaved": interleaved}
    if scale is not None:
        attrs["scale"] = scale
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "pk", "pv", "sl", "tl", "cos", "sin"],
                            ["out", "k", "v"], domain=domain, **attrs)
    f, hd, kv = TensorProto.FLOAT, shape.head_size, shape.kv_heads
    inputs = [
        helper.make_tensor_value_info("qkv", f, ["B", "S", (shape.num_heads + 2 * kv) * hd]),
        helper.make_tensor_value_info("pk", f, ["B", kv, "P", hd]),
        helper.make_tensor_value_info("pv", f, ["B", kv, "P", hd]),
        helper.make_tensor_value_info("sl", TensorProto.INT32, ["B"]),
        helper.make_tensor_value_info("tl", TensorProto.INT32, []),
        helper.make_tensor_value_info("cos", f, [shape.max_positions, hd // 2]),
        helper.make_tensor_value_info("sin", f, [shape.max_positions, hd // 2]),
    ]
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("out", "k", "v")]
    graph = helper.make_graph([node], "gqa", inputs, outputs)
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
        self.pk = np.zeros((batch, kv, capacity, hd), np.float32)
        self.pv = np.zeros_like(self.pk)
        self.pk[:, :, :past] = rng.standard_normal((batch, kv, past, hd))
        self.pv[:, :, :past] = rng.standard_normal((batch, kv, past, hd))
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
                io.bind_input(name, "cpu", 0, np.float32, buf.shape, buf.ctypes.data)
            io.bind_output("k", "cpu", 0, np.float32, self.pk.shape, self.pk.ctypes.data)
            io.bind_output("v", "cpu", 0, np.float32, self.pv.shape, self.pv.ctypes.data)
            io.bind_output("out", "cpu", 0, np.float32, self.out.shape, self.out.ctypes.data)
            self.io = io

    def run(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.shared:
            out, k, v = self.sess.run(None, {**self.feeds, "pk": self.pk, "pv": self.pv})
            return out, k, v
        self.sess.run_with_iobinding(self.io)  # appends the same rows again each call: timing repeats one step
        return self.out.copy(), self.pk.copy(), self.pv.copy()
