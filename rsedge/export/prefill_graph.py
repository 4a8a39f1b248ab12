"""An INT8 prefill twin of a MatMulNBits decoder graph, for CPUs whose INT8 GEMMs outrun MatMulNBits at length.

A decode step multiplies one row by every weight: the fewest bytes win, and block-wise INT4 MatMulNBits is the
fastest form there is. A prefill multiplies hundreds of rows: it is arithmetic, and onnxruntime's dense
u8 x s8 GEMM (DynamicQuantizeMatMul: activations quantized per tensor on the fly, weights INT8 per output
channel) runs far faster than MatMulNBits, measured 4-5x for a 765 x 896 x 4864 product on an AMX CPU (MLAS
takes AMX tiles for that GEMM, not for MatMulNBits). So a bundle may carry, per expert, this twin: the same
graph (same I/O, same KV cache layout) with every MatMulNBits but the lm_head (one row in a prefill too) made a
DynamicQuantizeMatMul. The runtime runs the prompt through the twin and the answer's tokens through the decoder,
over one KV cache.

The twin's INT8 weights are requantized from the decoder's own codes (dequantized: any AWQ scaling or kept
weights are already in them), so both graphs compute with the same weights up to an INT8 rounding. Attention
weights go to ``decoder_prefill_shared.bin`` (stored once for every expert), each expert's MLP weights to
``decoder_prefill_expert{e}.bin``.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
from onnx import helper

from rsedge.export.decoder_graph import DECODER_SHARED_BIN
from rsedge.export.weight_store import WeightStore

PREFILL_SHARED_BIN = "decoder_prefill_shared.bin"
FORM = {
    "op": "DynamicQuantizeMatMul",
    "weights": "INT8 per output channel, requantized from the decoder's codes",
    "activations": "UINT8 per tensor, quantized on the fly",
    "lm_head": "the decoder's (one row)",
}


def prefill_onnx(expert: int) -> str:
    return f"decoder_prefill_expert{expert}.onnx"


def prefill_bin(expert: int) -> str:
    return f"decoder_prefill_expert{expert}.bin"


def _location(t: onnx.TensorProto) -> str:
    return next(e.value for e in t.external_data if e.key == "location")


def dequantize_nbits(
    codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, k: int
) -> np.ndarray:
    """MatMulNBits' weights as float32 [N, K]: codes [N, blocks, block bytes], scales [N * blocks] or [N, blocks],
    zero points packed like the codes (default: the middle of the range, 8 or 128)."""
    n, blocks, blob = codes.shape
    per_block = blob * 8 // bits
    if bits == 4:
        q = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(n, blocks, per_block).astype(np.int16)
    else:
        q = codes.astype(np.int16)
    if zero_points is None:
        zp = np.full((n, blocks, 1), 1 << (bits - 1), dtype=np.int16)
    elif bits == 4:
        zp = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(n, -1)[:, :blocks, None]
    else:
        zp = zero_points.reshape(n, -1)[:, :blocks, None]
    w = (q - zp.astype(np.int16)).astype(np.float32) * scales.reshape(n, blocks)[:, :, None].astype(np.float32)
    return w.reshape(n, blocks * per_block)[:, :k]


def int8_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT8 per output channel of W [N, K]: (codes [K, N] as DynamicQuantizeMatMul takes B, scales [N])."""
    scale = np.abs(w).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    codes = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return np.ascontiguousarray(codes.T), scale.astype(np.float32)


def build_prefill_graph(
    decoder: onnx.ModelProto, store: WeightStore, expert: int, memo: dict[str, tuple[np.ndarray, np.ndarray]]
) -> onnx.ModelProto:
    """The INT8 prefill twin of ``decoder`` (whose initializers lie in ``store``'s files); ``memo`` keeps the
    requantized weights one export computes once for every expert (the attention's)."""
    model = copy.deepcopy(decoder)
    inits = {t.name: t for t in model.graph.initializer}

    def read(name: str) -> np.ndarray:
        t = inits[name]
        rec = store.record(name, _location(t))
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        return np.asarray(np.memmap(store.folder / rec.file, dtype=dtype, mode="r", offset=rec.offset, shape=rec.shape))

    nodes = []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or "lm_head" in node.name:
            nodes.append(node)
            continue
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        b_name, s_name = node.input[1], node.input[2]
        zp_name = node.input[3] if len(node.input) > 3 and node.input[3] else None
        bias = node.input[5] if len(node.input) > 5 else ""
        shared = _location(inits[b_name]) == store.file_name(DECODER_SHARED_BIN)
        target = PREFILL_SHARED_BIN if shared else prefill_bin(expert)

        def requantized(b_name=b_name, s_name=s_name, zp_name=zp_name, a=a) -> tuple[np.ndarray, np.ndarray]:
            if b_name not in memo:
                zp = read(zp_name) if zp_name else None
                w = dequantize_nbits(read(b_name), read(s_name), zp, int(a["bits"]), int(a["K"]))
                memo[b_name] = int8_per_channel(w)
            return memo[b_name]

        w8 = store.tensor(f"{b_name}.prefill_i8", lambda r=requantized: r()[0], file=target)
        sc = store.tensor(f"{b_name}.prefill_scales", lambda r=requantized: r()[1], file=target)
        model.graph.initializer.extend([w8, sc])
        nodes.append(
            helper.make_node(
                "DynamicQuantizeMatMul",
                [node.input[0], w8.name, sc.name, "", bias],
                list(node.output),
                name=node.name.replace("MatMulNBits", "DynamicQuantizeMatMul"),
                domain="com.microsoft",
            )
        )
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    model.graph.name = f"{decoder.graph.name}_prefill"
    model.doc_string = "INT8 prefill twin (DynamicQuantizeMatMul) of: " + decoder.doc_string
    return model
